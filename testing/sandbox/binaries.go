// Package sandbox runs a real Kubernetes control plane and "nodes" and
// "pods" as network namespaces on one machine, with egressvip running in
// each node namespace the way its DaemonSet would. It is the harness of the
// end-to-end suite (testing/e2e), the demo (testing/cmd/demo) and benchmarks.
//
// Nothing is changed in the root network namespace: the two bridges live in
// a "fabric" namespace, the control plane in its own namespace, and the
// test process reaches the API server by opening its sockets from a thread
// inside the control-plane namespace.
package sandbox

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// KubernetesVersion is the control plane the sandbox builds.
const KubernetesVersion = "v1.37.2"

// repoRoot finds the egressvip checkout from this source file.
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// CacheDir is where built control-plane binaries are kept, outside the
// checkout so clean clones on one machine share them.
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

// Binaries are the paths of the programs the sandbox runs.
type Binaries struct {
	APIServer, ControllerManager, Kubectl, KubeProxy, Etcd, EgressVIP string
}

// kubeCommands are the Kubernetes commands built from testing/tools, in
// one go build.
var kubeCommands = []string{"kube-apiserver", "kube-controller-manager", "kubectl", "kube-proxy"}

// EnsureBinaries builds kube-apiserver, kube-controller-manager, kubectl
// and kube-proxy from the Go module proxy (testing/tools pins the version)
// unless the cache has them all, and egressvip from this checkout into dir.
func EnsureBinaries(dir string, logf func(string, ...any)) (Binaries, error) {
	b := Binaries{Etcd: "/usr/bin/etcd", EgressVIP: filepath.Join(dir, "egressvip")}
	if _, err := os.Stat(b.Etcd); err != nil {
		return b, fmt.Errorf("etcd not found at %s: install Debian's etcd-server (make deps)", b.Etcd)
	}
	kdir := filepath.Join(CacheDir(), "k8s-"+KubernetesVersion)
	b.APIServer = filepath.Join(kdir, "kube-apiserver")
	b.ControllerManager = filepath.Join(kdir, "kube-controller-manager")
	b.Kubectl = filepath.Join(kdir, "kubectl")
	b.KubeProxy = filepath.Join(kdir, "kube-proxy")
	if !exists(b.APIServer) || !exists(b.ControllerManager) || !exists(b.Kubectl) || !exists(b.KubeProxy) {
		logf("building %s %s into %s (about 10-15 minutes on 2 cores the first time)", strings.Join(kubeCommands, ", "), KubernetesVersion, kdir)
		if err := os.MkdirAll(kdir, 0o755); err != nil {
			return b, err
		}
		tmp, err := os.MkdirTemp(kdir, "build-")
		if err != nil {
			return b, err
		}
		defer os.RemoveAll(tmp)
		args := []string{"build", "-o", tmp + "/"}
		for _, name := range kubeCommands {
			args = append(args, "k8s.io/kubernetes/cmd/"+name)
		}
		cmd := exec.Command("go", args...)
		cmd.Dir = filepath.Join(repoRoot(), "testing", "tools")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod")
		if out, err := cmd.CombinedOutput(); err != nil {
			return b, fmt.Errorf("build the Kubernetes commands: %w\n%s", err, tail(out))
		}
		for _, name := range kubeCommands {
			if err := os.Rename(filepath.Join(tmp, name), filepath.Join(kdir, name)); err != nil {
				return b, err
			}
		}
	}
	// Built as the Dockerfile builds it, so that the suites and the scale
	// benchmark run (and measure the memory of) the binary that ships.
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", b.EgressVIP, "./cmd/egressvip")
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return b, fmt.Errorf("build egressvip: %w\n%s", err, out)
	}
	return b, nil
}

func exists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

func tail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 4000 {
		s = "..." + s[len(s)-4000:]
	}
	return s
}
