package netif

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Conflict is another host on the serviceInterface's link claiming or
// probing an address egressvip holds there.
type Conflict struct {
	Addr netip.Addr
	// MAC is the other host's: the sender hardware address of its ARP
	// frame, the link-layer address its neighbour discovery message
	// carries, else its Ethernet source.
	MAC net.HardwareAddr
	// Probe: it only asked whether the address is free (an ARP probe, a
	// DAD solicitation), which a host does before it binds the address.
	// Otherwise it uses the address already.
	Probe bool
	// At is when the frame was read.
	At time.Time
}

const (
	// conflictCheckInterval: how often Conflicts checks that the interface
	// is still the one its socket is bound to (a rename, a new MAC), when
	// no frame and no socket error told it before.
	conflictCheckInterval = time.Second
	// conflictBackoffMax caps the wait between attempts to open the
	// socket again, also while the interface is missing: a re-created
	// interface is listened to within about a second.
	conflictBackoffMax = time.Second
	// conflictRcvBuf is the packet socket's receive buffer: about a
	// thousand frames of ARP and neighbour discovery.
	conflictRcvBuf = 1 << 20
)

// Conflicts listens on the serviceInterface until ctx ends and calls fn,
// within milliseconds, for every frame from a MAC other than the
// interface's own that claims or probes an address egressvip owns there
// (by the markers of Owned, as the kernel has them at that moment, so also
// addresses an earlier process bound, and never one that expired): an ARP
// request or reply (gratuitous or not) whose sender address is ours, an ARP
// probe (sender 0.0.0.0) whose target is ours, a neighbour advertisement
// whose target is ours, a DAD solicitation (from ::) whose target is ours,
// or a solicitation sent from one of our addresses. An ordinary ARP request
// or solicitation for one of our addresses (a neighbour resolving it) is
// no conflict, and neither are the node's own frames (its announcements,
// its probes).
//
// One packet socket serves every address, with a filter that passes only
// ARP and neighbour discovery; a netlink subscription follows the owned
// addresses. fn runs on Conflicts' goroutine and must be cheap and not
// block (poke a queue). Conflicts returns nil when ctx ends, and an error
// only when it cannot listen at all the first time (a missing interface is
// waited for). When the interface is deleted, re-created or renamed it
// listens on the new one; a frame that arrives while it reopens is missed.
// It works in Config.NetNS. Run at most one per Manager.
func (m *Manager) Conflicts(ctx context.Context, fn func(Conflict)) error {
	backoff := watchBackoffMin
	for attempt := 0; ; attempt++ {
		started := time.Now()
		listened, err := m.conflictsOnce(ctx, fn)
		if ctx.Err() != nil {
			return nil
		}
		missing := errors.Is(err, ErrInterfaceNotFound)
		if attempt == 0 && !listened && !missing {
			return err
		}
		if listened && time.Since(started) > backoff {
			backoff = watchBackoffMin
		}
		log := m.log.WithError(err).WithField("retry_in", backoff)
		if missing {
			log.Debug("conflict detection: waiting for the interface")
		} else {
			log.Info("conflict detection: listening again")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, conflictBackoffMax)
	}
}

// conflictsOnce listens on the interface as it is now until ctx ends or
// the interface is gone; listened says whether the socket was opened.
func (m *Manager) conflictsOnce(ctx context.Context, fn func(Conflict)) (listened bool, err error) {
	ifi, err := m.ethernet()
	if err != nil {
		return false, err
	}
	// Subscribed before the socket opens and the listing: no change of
	// the owned addresses falls in between.
	owned, err := m.followOwned(ifi.Index)
	if err != nil {
		return false, err
	}
	defer owned.close()
	conn, err := m.listenACD(ifi, conflictRcvBuf)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	m.log.WithField("index", ifi.Index).Debug("conflict detection: listening")

	mac := ifi.HardwareAddr
	buf := make([]byte, snapLen)
	failures := 0
	_ = conn.SetReadDeadline(time.Now().Add(conflictCheckInterval))
	for {
		n, _, err := conn.ReadFrom(buf)
		if ctx.Err() != nil {
			return true, nil
		}
		if err != nil {
			// A timeout is the periodic check; ENETDOWN comes once when
			// the interface went down (the socket resumes when it comes
			// up) or was deleted. Other errors that keep coming make it
			// open a new socket.
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				if failures++; failures > 10 {
					return true, fmt.Errorf("read from the packet socket: %w", err)
				}
			}
			now, err := m.ethernet()
			switch {
			case err != nil:
				return true, err
			case now.Index != ifi.Index:
				return true, fmt.Errorf("interface %q re-created", m.cfg.Interface)
			}
			mac = now.HardwareAddr
			if err := owned.update(); err != nil {
				return true, err
			}
			_ = conn.SetReadDeadline(time.Now().Add(conflictCheckInterval))
			continue
		}
		failures = 0
		c, ok := parseClaim(buf[:n])
		if !ok || sameMAC(c.mac, mac) || sameMAC(c.src, mac) {
			continue
		}
		// The kernel's notifications up to now first: an address removed
		// (or expired) a moment ago is no longer ours to defend.
		if err := owned.update(); err != nil {
			return true, err
		}
		if !owned.addrs[c.ip] {
			continue
		}
		fn(Conflict{Addr: c.ip, MAC: append(net.HardwareAddr(nil), c.mac...), Probe: c.probe, At: time.Now()})
	}
}

// ownedAddrs follows the addresses egressvip owns on one interface: a
// listing, then the kernel's address notifications, read whenever the
// answer is needed. Not safe for concurrent use.
type ownedAddrs struct {
	m      *Manager
	index  int
	sock   *nl.NetlinkSocket
	buf    []byte
	addrs  map[netip.Addr]bool
	resync bool // notifications were lost: list again
}

// followOwned subscribes to the address notifications of Config.NetNS and
// lists the owned addresses of the interface with index.
func (m *Manager) followOwned(index int) (*ownedAddrs, error) {
	ns := netns.None()
	if m.cfg.inOtherNS() {
		ns = m.cfg.NetNS
	}
	s, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR)
	if err != nil {
		return nil, fmt.Errorf("subscribe to address updates: %w", err)
	}
	if unix.SetsockoptInt(s.GetFd(), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, watchRcvBuf) != nil {
		_ = unix.SetsockoptInt(s.GetFd(), unix.SOL_SOCKET, unix.SO_RCVBUF, watchRcvBuf)
	}
	o := &ownedAddrs{m: m, index: index, sock: s, buf: make([]byte, 8<<10), addrs: map[netip.Addr]bool{}, resync: true}
	if err := o.update(); err != nil {
		s.Close()
		return nil, err
	}
	return o, nil
}

func (o *ownedAddrs) close() { o.sock.Close() }

// update applies the notifications that arrived, without waiting for
// more, and lists the addresses again when some were lost.
func (o *ownedAddrs) update() error {
	for {
		n, _, err := unix.Recvfrom(o.sock.GetFd(), o.buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		switch {
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.ENOBUFS):
			o.resync = true
		case err != nil:
			return fmt.Errorf("read address updates: %w", err)
		default:
			msgs, err := syscall.ParseNetlinkMessage(o.buf[:n])
			if err != nil {
				return fmt.Errorf("address update: %w", err)
			}
			for _, msg := range msgs {
				o.apply(msg.Header.Type, msg.Data)
			}
		}
	}
	if !o.resync {
		return nil
	}
	err := o.m.eachAddr(o.index, func() { clear(o.addrs) }, func(a ifAddr, _ []byte) error {
		if o.m.owned(a) {
			o.addrs[a.ip] = true
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", o.m.cfg.Interface, err)
	}
	o.resync = false
	return nil
}

// apply records one notification. Only full-length addresses can be ours:
// an IPv4 /24 deleted beside an owned /32 of the same address is not a
// loss. A full-length one that is no longer marked is no longer ours.
func (o *ownedAddrs) apply(typ uint16, data []byte) {
	if typ != unix.RTM_NEWADDR && typ != unix.RTM_DELADDR {
		return
	}
	a, ok, err := decodeAddr(data)
	if err != nil || !ok || a.index != o.index || !a.full {
		return
	}
	if typ == unix.RTM_NEWADDR && o.m.owned(a) {
		o.addrs[a.ip] = true
	} else {
		delete(o.addrs, a.ip)
	}
}
