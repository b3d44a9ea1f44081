package sandbox

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// Prefix starts every network namespace the sandbox makes, so a run can
// remove what a killed run left behind.
const Prefix = "evsb-"

// sh runs a command and returns its combined output, with the output in
// the error.
func sh(args ...string) (string, error) {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// shAll runs commands in order and stops at the first error.
func shAll(cmds ...[]string) error {
	for _, c := range cmds {
		if _, err := sh(c...); err != nil {
			return err
		}
	}
	return nil
}

// InNS runs a command inside a namespace.
func InNS(ns string, args ...string) (string, error) {
	return sh(append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// addNS creates a namespace with lo up and its own resolv.conf, so nothing
// inside waits on the host's unreachable resolver.
func addNS(name string) error {
	if err := os.MkdirAll(filepath.Join("/etc/netns", name), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join("/etc/netns", name, "resolv.conf"), []byte("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"), 0o644); err != nil {
		return err
	}
	return shAll([]string{"ip", "netns", "add", name}, []string{"ip", "-n", name, "link", "set", "lo", "up"})
}

// delNS kills what runs inside a namespace and deletes it.
func delNS(name string) {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			_ = exec.Command("kill", "-9", pid).Run()
		}
	}
	_ = exec.Command("ip", "netns", "del", name).Run()
	_ = os.RemoveAll(filepath.Join("/etc/netns", name))
}

// CleanLeftovers deletes every sandbox namespace, for example from a run
// that was killed before its teardown.
func CleanLeftovers() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], Prefix) {
			delNS(f[0])
		}
	}
	entries, _ := os.ReadDir("/etc/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), Prefix) {
			_ = os.RemoveAll(filepath.Join("/etc/netns", e.Name()))
		}
	}
}

// Do runs fn on a thread inside namespace ns. Sockets fn opens stay in ns.
func Do(ns string, fn func() error) error {
	h, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", ns, err)
	}
	defer h.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(h); err != nil {
			done <- fmt.Errorf("enter netns %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked and dies with the goroutine.
			done <- fmt.Errorf("leave netns %s: %w", ns, err)
			return
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}

// DialIn returns a dial function whose sockets are created inside ns.
func DialIn(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := Do(ns, func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// veth links namespace a (interface aName) with namespace b (bName) and
// brings both ends up.
func veth(a, aName, b, bName string) error {
	return shAll(
		[]string{"ip", "-n", a, "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b},
		[]string{"ip", "-n", a, "link", "set", aName, "up"},
		[]string{"ip", "-n", b, "link", "set", bName, "up"},
	)
}
