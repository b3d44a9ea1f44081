package netif

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Re-subscription backoff of Watch: from watchBackoffMin, doubling up to
// watchBackoffMax; a subscription that lived watchBackoffReset starts over.
const (
	watchBackoffMin   = 100 * time.Millisecond
	watchBackoffMax   = 5 * time.Second
	watchBackoffReset = 30 * time.Second
	// watchRcvBuf is the receive buffer asked for each subscription (the
	// kernel caps it at net.core.rmem_max): a node that creates and
	// deletes pod interfaces in bursts must not overflow it.
	watchRcvBuf = 1 << 20
)

// Watch follows the kernel's address and link notifications for the
// serviceInterface and calls onChange when something Sync restores was lost:
//
//   - an address of the last Sync's want was deleted from the interface
//     (Sync's own removals never are: it removes only what it does not want),
//     also by the kernel when its lifetime ran out (Config.Lifetime): the
//     next Sync adds it again unless its binding is KeepOnly, and reports
//     it Absent then;
//   - the interface went down or came up (administratively or its carrier;
//     going down drops the IPv6 addresses, coming up needs announcements);
//   - the interface was deleted, re-created (a new index) or renamed.
//
// Churn on other interfaces, and address additions, are ignored. onChange
// runs on Watch's goroutine and must be cheap and non-blocking: poke a
// coalescing queue whose worker calls Sync. Watch also calls it once each
// time it has (re)subscribed, since anything may have changed before.
// After a link transition the next Sync on an up interface announces every
// owned address again.
//
// Watch blocks until ctx ends and then returns nil. It returns an error
// only when the first subscription fails; when a subscription ends later
// (for example the socket overflowed and events were lost) it subscribes
// again after a backoff of 100 ms doubling up to 5 s, and the next Sync
// announces every address again, as a lost event may have been a link
// flap. Run at most one Watch per Manager.
func (m *Manager) Watch(ctx context.Context, onChange func()) error {
	backoff := watchBackoffMin
	for attempt := 0; ; attempt++ {
		started := time.Now()
		subscribed, err := m.watchOnce(ctx, onChange, attempt > 0)
		if ctx.Err() != nil {
			return nil
		}
		if attempt == 0 && !subscribed {
			return err
		}
		if time.Since(started) > watchBackoffReset {
			backoff = watchBackoffMin
		}
		m.log.WithError(err).WithField("retry_in", backoff).Warn("netlink subscription ended; subscribing again")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, watchBackoffMax)
	}
}

// watchOnce runs one pair of subscriptions until ctx ends or one of them
// does; subscribed says whether both were established.
func (m *Manager) watchOnce(ctx context.Context, onChange func(), resumed bool) (subscribed bool, err error) {
	done := make(chan struct{})
	var stopping atomic.Bool
	var linkCh chan netlink.LinkUpdate
	var addrCh chan netlink.AddrUpdate
	defer func() {
		// Closing done closes the sockets; the library's readers then
		// close their channels. Drain them so that no reader stays
		// blocked on a send.
		stopping.Store(true)
		close(done)
		if linkCh != nil {
			for range linkCh {
			}
		}
		if addrCh != nil {
			for range addrCh {
			}
		}
	}()
	onErr := func(err error) {
		if !stopping.Load() {
			m.log.WithError(err).Warn("netlink subscription")
		}
	}
	var ns *netns.NsHandle
	if m.cfg.inOtherNS() {
		h := m.cfg.NetNS
		ns = &h
	}

	lc := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(lc, done, netlink.LinkSubscribeOptions{
		Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: watchRcvBuf,
	}); err != nil {
		return false, fmt.Errorf("subscribe to link updates: %w", err)
	}
	linkCh = lc
	ac := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(ac, done, netlink.AddrSubscribeOptions{
		Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: watchRcvBuf,
	}); err != nil {
		return false, fmt.Errorf("subscribe to address updates: %w", err)
	}
	addrCh = ac

	// Subscribed first, read the interface after: no change falls in
	// between.
	w := watcher{m: m, onChange: onChange}
	if l, err := m.link(); err == nil {
		w.index, w.up = l.Attrs().Index, linkUp(l.Attrs())
	} else if !errors.Is(err, ErrInterfaceNotFound) {
		m.log.WithError(err).Warn("watch: cannot read the interface")
	}
	if resumed {
		m.markReannounce()
	}
	m.log.WithField("index", w.index).Debug("watching the interface")
	onChange()

	for {
		select {
		case <-ctx.Done():
			return true, nil
		case u, ok := <-linkCh:
			if !ok {
				linkCh = nil
				return true, errors.New("link subscription ended")
			}
			w.link(u)
		case u, ok := <-addrCh:
			if !ok {
				addrCh = nil
				return true, errors.New("address subscription ended")
			}
			w.addr(u)
		}
	}
}

func (m *Manager) markReannounce() {
	m.state.mu.Lock()
	m.state.reannounce = true
	m.state.mu.Unlock()
}

// watcher is Watch's view of the interface: index 0 while it is missing.
type watcher struct {
	m        *Manager
	onChange func()
	index    int
	up       bool
}

func (w *watcher) link(u netlink.LinkUpdate) {
	// Bridge port notifications (AF_BRIDGE) say nothing about the link
	// itself; an RTM_DELLINK of that family only means "left the bridge".
	if u.IfInfomsg.Family != unix.AF_UNSPEC || u.Link == nil {
		return
	}
	a := u.Link.Attrs()
	switch {
	case u.Header.Type == unix.RTM_DELLINK:
		if w.index != 0 && a.Index == w.index {
			w.index, w.up = 0, false
			w.changed("interface deleted")
		}
	case a.Name == w.m.cfg.Interface:
		up := linkUp(a)
		switch {
		case a.Index != w.index:
			w.index, w.up = a.Index, up
			w.changed("interface created")
		case up != w.up:
			w.up = up
			if up {
				w.changed("interface up")
			} else {
				w.changed("interface down")
			}
		}
	case w.index != 0 && a.Index == w.index:
		w.index, w.up = 0, false
		w.changed("interface renamed to " + a.Name)
	}
}

func (w *watcher) changed(what string) {
	w.m.markReannounce()
	w.m.log.WithField("index", w.index).Debug("watch: " + what)
	w.onChange()
}

func (w *watcher) addr(u netlink.AddrUpdate) {
	if u.NewAddr || w.index == 0 || u.LinkIndex != w.index {
		return
	}
	ip, ok := netip.AddrFromSlice(u.LinkAddress.IP)
	if !ok {
		return
	}
	ip = ip.Unmap()
	if ones, bits := u.LinkAddress.Mask.Size(); ones != bits {
		return // owned addresses are full length
	}
	w.m.state.mu.Lock()
	lost := false
	if wanted := w.m.state.wanted; wanted != nil {
		_, lost = wanted.index[ip]
	}
	w.m.state.mu.Unlock()
	if lost {
		w.m.log.WithField("ip", ip.String()).Debug("watch: address deleted")
		w.onChange()
	}
}
