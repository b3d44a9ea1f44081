package sandbox

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vishvananda/netns"
)

// Prefix starts every network namespace the sandbox makes. A run's
// namespaces are named Prefix + runID + "-" + role, where runID is the
// process id; a run holds an flock on lockDir/<runID>.lock for as long as its
// namespaces exist, so a later run can tell the leftovers of a killed run
// (lock free) from those of a run still going (lock held) and removes only
// the former.
const Prefix = "evsb-"

// lockDir holds the runs' lock files; /run is a tmpfs, cleared on reboot
// together with the namespaces.
const lockDir = "/run/egressvip-sandbox"

// runID identifies this process's sandbox. One cluster per process at a
// time (Start refuses a second one).
var runID = strconv.Itoa(os.Getpid())

// nsName is the name of this run's namespace for role.
func nsName(role string) string { return Prefix + runID + "-" + role }

// runOf returns the run id of a sandbox namespace name, "" for a name of
// another shape (an older layout, always a leftover).
func runOf(ns string) string {
	rest, ok := strings.CutPrefix(ns, Prefix)
	if !ok {
		return ""
	}
	id, _, ok := strings.Cut(rest, "-")
	if !ok {
		return ""
	}
	if _, err := strconv.Atoi(id); err != nil {
		return ""
	}
	return id
}

// lockRun takes this run's lock; the returned file must stay open while
// the run's namespaces exist.
func lockRun() (*os.File, error) {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(lockDir, runID+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: another sandbox runs in this process: %w", f.Name(), err)
	}
	return f, nil
}

// unlockRun releases this run's lock and removes its file.
func unlockRun(f *os.File) {
	if f == nil {
		return
	}
	_ = os.Remove(f.Name())
	_ = f.Close()
}

// runAlive reports whether the run id still holds its lock.
func runAlive(id string) bool {
	if id == "" {
		return false
	}
	f, err := os.OpenFile(filepath.Join(lockDir, id+".lock"), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

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

// CleanLeftovers deletes the namespaces (and their /etc/netns entries) of
// sandbox runs that are gone, for example killed before their teardown.
// Namespaces of runs still going are left alone.
func CleanLeftovers() {
	deleteNamespaces(func(ns string) bool { return !runAlive(runOf(ns)) })
	locks, _ := os.ReadDir(lockDir)
	for _, e := range locks {
		if id, ok := strings.CutSuffix(e.Name(), ".lock"); ok && !runAlive(id) {
			_ = os.Remove(filepath.Join(lockDir, e.Name()))
		}
	}
}

// deleteOwn deletes every namespace of this run.
func deleteOwn() {
	deleteNamespaces(func(ns string) bool { return runOf(ns) == runID })
}

// deleteNamespaces deletes the sandbox namespaces (and /etc/netns entries)
// that match.
func deleteNamespaces(match func(ns string) bool) {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], Prefix) && match(f[0]) {
			delNS(f[0])
		}
	}
	entries, _ := os.ReadDir("/etc/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), Prefix) && match(e.Name()) {
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

// startReq asks the spawner thread to start a command.
type startReq struct {
	cmd  *exec.Cmd
	done chan error
}

var (
	spawnOnce sync.Once
	spawnReqs chan startReq
)

// startLogging starts cmd (startKilledWithUs) with its output to logFile,
// which it closes; exited is closed once cmd has exited.
func startLogging(cmd *exec.Cmd, logFile *os.File) (exited chan struct{}, err error) {
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := startKilledWithUs(cmd); err != nil {
		logFile.Close()
		return nil, err
	}
	exited = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(exited)
	}()
	return exited, nil
}

// startKilledWithUs starts cmd so that it gets SIGKILL if this process
// dies. Pdeathsig follows the thread that forked the child, not the
// process, and Go ends a thread whose goroutine exits while locked to it
// (as a goroutine that entered a namespace may), which would kill an
// unrelated child in the middle of a run. So every child is forked from one
// goroutine locked to its thread for the life of the process.
func startKilledWithUs(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnReqs = make(chan startReq)
		go func() {
			runtime.LockOSThread()
			for r := range spawnReqs {
				r.done <- r.cmd.Start()
			}
		}()
	})
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	done := make(chan error, 1)
	spawnReqs <- startReq{cmd: cmd, done: done}
	return <-done
}
