// Package helmtool builds the helm CLI the chart tests run, from the Go
// module proxy (testing/tools/helm pins the version), into the cache the
// sandbox uses for its control plane.
package helmtool

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// Version is the helm release testing/tools/helm/go.mod pins; the cached
// binary is kept under it, so a bump builds a new one.
const Version = "v4.3.2"

// RequireEnv makes tests that need helm fail instead of skip when helm
// cannot be built (no Go, no module proxy). .ci/run sets it.
const RequireEnv = "EGRESSVIP_REQUIRE_PRIVILEGED"

// CacheDir is where built tools are kept, outside the checkout so clean
// clones on one machine share them: $EGRESSVIP_CACHE or ~/.cache/egressvip,
// as testing/sandbox.CacheDir.
func CacheDir() string {
	if d := os.Getenv("EGRESSVIP_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "egressvip")
}

// ModuleDir is testing/tools/helm in this checkout.
func ModuleDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "tools", "helm")
}

var ensured struct {
	once sync.Once
	path string
	err  error
}

// EnsureHelm returns the path of helm Version, building
// helm.sh/helm/v4/cmd/helm into CacheDir()/helm-<Version>/ unless it is
// there: about 5 minutes of 2 cores the first time. Concurrent callers (go
// test runs packages in parallel) wait on a lock file and build once. A
// process builds at most once: later calls return the first answer.
func EnsureHelm() (string, error) {
	ensured.once.Do(func() { ensured.path, ensured.err = ensureHelm() })
	return ensured.path, ensured.err
}

func ensureHelm() (string, error) {
	dir := filepath.Join(CacheDir(), "helm-"+Version)
	bin := filepath.Join(dir, "helm")
	if isFile(bin) {
		return bin, nil
	}
	if _, err := exec.LookPath("go"); err != nil {
		return "", fmt.Errorf("build helm %s: go not on PATH: %w", Version, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer func() { _ = syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) }()
	if isFile(bin) { // another process built it while this one waited
		return bin, nil
	}
	tmp, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	// helm's Makefile stamps the version the same way; without it `helm
	// version` says "v4.3".
	ldflags := "-s -w -X helm.sh/helm/v4/internal/version.version=" + Version
	cmd := exec.Command("go", "build", "-ldflags", ldflags, "-o", filepath.Join(tmp, "helm"), "helm.sh/helm/v4/cmd/helm")
	cmd.Dir = ModuleDir()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=readonly", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build helm %s in %s: %w\n%s", Version, cmd.Dir, err, tail(out))
	}
	// A rename within one directory is atomic: a reader sees no binary or
	// a whole one.
	if err := os.Rename(filepath.Join(tmp, "helm"), bin); err != nil {
		return "", err
	}
	return bin, nil
}

// Require returns helm's path for a test. When helm cannot be had it skips
// the test, or fails it when RequireEnv=1.
//
// Call EnsureHelm from TestMain before m.Run as well: go test's -timeout
// (10 minutes by default) starts in m.Run, and a first build on a busy
// machine can take longer than that.
func Require(t testing.TB) string {
	t.Helper()
	bin, err := EnsureHelm()
	if err == nil {
		return bin
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("helm %s is needed and could not be built: %v (%s=1)", Version, err, RequireEnv)
	}
	t.Skipf("skipping: helm %s could not be built (needs Go and the Go module proxy): %v (set %s=1 to fail instead)", Version, err, RequireEnv)
	return ""
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

func tail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 4000 {
		s = "..." + s[len(s)-4000:]
	}
	return s
}
