// Package privtest holds helpers for privileged tests: the root check and
// network namespaces that are created for one test and deleted after it,
// also when it fails.
package privtest

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netns"
)

// RequireEnv makes privileged tests fail instead of skip when set to 1.
// .ci/run sets it so that CI always runs them.
const RequireEnv = "EGRESSVIP_REQUIRE_PRIVILEGED"

// Require skips the test when it cannot run privileged tests (not root, or a
// required binary is missing), or fails it when RequireEnv=1.
func Require(t testing.TB, binaries ...string) {
	t.Helper()
	var why string
	if os.Geteuid() != 0 {
		why = "needs root (network namespaces, netlink, iptables)"
	}
	for _, b := range append([]string{"ip"}, binaries...) {
		if why != "" {
			break
		}
		if _, err := exec.LookPath(b); err != nil {
			why = fmt.Sprintf("needs %s in PATH", b)
		}
	}
	if why == "" {
		return
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("privileged test cannot run: %s (%s=1)", why, RequireEnv)
	}
	t.Skipf("skipping privileged test: %s (set %s=1 to fail instead)", why, RequireEnv)
}

var counter atomic.Int64

// NS is a network namespace owned by one test.
type NS struct {
	Name   string
	Handle netns.NsHandle
}

// NewNS creates a fresh named network namespace with lo up and registers its
// deletion with t.Cleanup. Names are unique per process.
func NewNS(t testing.TB, prefix string) *NS {
	t.Helper()
	name := fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), counter.Add(1))
	if len(name) > 40 {
		name = name[len(name)-40:]
	}
	MustRun(t, "ip", "netns", "add", name)
	ns := &NS{Name: name}
	t.Cleanup(func() {
		if ns.Handle.IsOpen() {
			_ = ns.Handle.Close()
		}
		// Kill anything still running inside before deleting.
		if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
			for _, pid := range strings.Fields(string(out)) {
				_ = exec.Command("kill", "-9", pid).Run()
			}
		}
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("delete netns %s: %v: %s", name, err, out)
		}
		_ = os.RemoveAll("/etc/netns/" + name)
	})
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	ns.Handle = h
	ns.Exec(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Exec runs a command inside the namespace and fails the test on error.
func (n *NS) Exec(t testing.TB, args ...string) string {
	t.Helper()
	return MustRun(t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// Try runs a command inside the namespace and returns its output and error.
func (n *NS) Try(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	return string(out), err
}

// Cmd returns an unstarted command that runs inside the namespace.
func (n *NS) Cmd(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Do runs fn on a locked OS thread switched into the namespace. Sockets,
// netlink handles and child processes started by fn belong to the
// namespace. fn must not call t.Fatal (it runs on another goroutine): return
// errors out instead.
func (n *NS) Do(t testing.TB, fn func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(n.Handle); err != nil {
			done <- fmt.Errorf("enter netns %s: %w", n.Name, err)
			return
		}
		fn()
		// Switch back before unlocking, so the thread (which may be the
		// process's main thread, that never exits) returns to the
		// scheduler in the namespace it came from. If that fails the
		// thread stays locked and dies with the goroutine.
		if err := netns.Set(orig); err != nil {
			done <- fmt.Errorf("return from netns %s: %w", n.Name, err)
			return
		}
		runtime.UnlockOSThread()
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// MustRun runs a command and fails the test with its output on error.
func MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Veth creates a veth pair with one end in a and the other in b.
func Veth(t testing.TB, a *NS, aName string, b *NS, bName string) {
	t.Helper()
	a.Exec(t, "ip", "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	a.Exec(t, "ip", "link", "set", aName, "up")
	b.Exec(t, "ip", "link", "set", bName, "up")
}
