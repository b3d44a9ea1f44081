package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Earlier releases of egressvip, built from this repository's own history,
// for upgrade and rollback tests: BuildRelease, ReleaseManifest,
// ReleaseDaemonEnv, ApplyReleaseRBAC and StartDaemonWith.

// git runs git in the checkout.
func git(args ...string) (string, error) { return gitIn(repoRoot(), args...) }

// gitIn runs git in dir.
func gitIn(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// resolveCommit returns the full hash of commit, or an error that says
// why it is not in this checkout's history.
func resolveCommit(commit string) (string, error) { return resolveCommitIn(repoRoot(), commit) }

// resolveCommitIn is resolveCommit in the repository at dir.
func resolveCommitIn(dir, commit string) (string, error) {
	if commit == "" || strings.HasPrefix(commit, "-") {
		return "", fmt.Errorf("commit %q: want a commit of this repository", commit)
	}
	out, err := gitIn(dir, "rev-parse", "--verify", "--quiet", commit+"^{commit}")
	if err != nil {
		shallow, _ := gitIn(dir, "rev-parse", "--is-shallow-repository")
		if strings.TrimSpace(shallow) == "true" {
			return "", fmt.Errorf("commit %s is not in this repository's history: the checkout is a shallow clone (git fetch --unshallow)", commit)
		}
		return "", fmt.Errorf("commit %s is not in this repository's history (git fetch the branch that has it)", commit)
	}
	return strings.TrimSpace(out), nil
}

// describeCommit names commit in messages.
func describeCommit(commit string) string {
	if commit == "" {
		return "the working tree"
	}
	return "commit " + commit
}

// ReleaseManifest returns manifests/name at commit (`git show
// <commit>:manifests/<name>`); "" reads the working tree.
func ReleaseManifest(commit, name string) ([]byte, error) {
	if commit == "" {
		return os.ReadFile(filepath.Join(repoRoot(), "manifests", name))
	}
	full, err := resolveCommit(commit)
	if err != nil {
		return nil, err
	}
	out, err := git("show", full+":manifests/"+name)
	if err != nil {
		return nil, fmt.Errorf("manifests/%s at %s: %w", name, commit, err)
	}
	return []byte(out), nil
}

// BuildRelease builds the egressvip daemon as it was at commit (a hash or
// any name git resolves in this checkout) and returns the binary's path.
// The source is `git archive` of that commit, so uncommitted changes and
// later commits play no part; it is built like the Dockerfile builds it
// (CGO_ENABLED=0, -trimpath) with that commit's go.mod, and cached by
// full commit hash under CacheDir()/releases. A commit missing from the
// history (a shallow clone) fails with a message that says so.
func BuildRelease(commit string) (string, error) {
	full, err := resolveCommit(commit)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(CacheDir(), "releases")
	bin := filepath.Join(dir, "egressvip-"+full)
	if exists(bin) {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	src, err := os.MkdirTemp(dir, "src-"+full[:12]+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(src)
	archive := exec.Command("git", "archive", "--format=tar", full)
	archive.Dir = repoRoot()
	untar := exec.Command("tar", "-x", "-C", src)
	pipe, err := archive.StdoutPipe()
	if err != nil {
		return "", err
	}
	untar.Stdin = pipe
	var archiveErr, untarErr bytes.Buffer
	archive.Stderr, untar.Stderr = &archiveErr, &untarErr
	if err := untar.Start(); err != nil {
		return "", err
	}
	if err := archive.Run(); err != nil {
		_ = untar.Wait()
		return "", fmt.Errorf("git archive %s: %w: %s", full, err, archiveErr.String())
	}
	if err := untar.Wait(); err != nil {
		return "", fmt.Errorf("untar %s: %w: %s", full, err, untarErr.String())
	}
	tmpBin := filepath.Join(src, "egressvip.bin")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+full[:12], "-o", tmpBin, "./cmd/egressvip")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build egressvip at %s: %w\n%s", full[:12], err, tail(out))
	}
	// Rename is atomic: a concurrent build of the same commit can only
	// replace one complete binary with another.
	if err := os.Rename(tmpBin, bin); err != nil {
		return "", err
	}
	return bin, nil
}

// ApplyReleaseRBAC applies manifests/rbac.yaml of commit on top of what the
// cluster has (the working tree's, applied at start), as a union: objects
// it lacks are created, Roles and ClusterRoles get the rules they lack,
// bindings the subjects they lack. Nothing is taken away, so both the
// checkout's daemon and that release's can run side by side.
func (c *Cluster) ApplyReleaseRBAC(ctx context.Context, commit string) error {
	objs, err := manifestObjectsAt(commit, "rbac.yaml")
	if err != nil {
		return err
	}
	if err := c.applyRBACObjects(ctx, objs, true); err != nil {
		return fmt.Errorf("manifests/rbac.yaml at %s: %w", commit, err)
	}
	return nil
}
