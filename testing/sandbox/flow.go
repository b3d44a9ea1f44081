package sandbox

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Flow is a stream of numbered UDP datagrams from a pod to the external
// host. Even-numbered datagrams use one long-lived socket (one conntrack
// entry for the whole flow); odd-numbered ones each use a new socket, so a
// new source port and a new conntrack entry: every other datagram meets
// the nat rules of that moment.
type Flow struct {
	Prefix   string
	Interval time.Duration

	c     *Cluster
	start time.Time
	stop  chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	sent  int
	err   error
	ended time.Time
}

// FlowReport is what the external host saw of a flow.
type FlowReport struct {
	Sent, Arrived int
	// Sources counts arrivals per source address.
	Sources map[netip.Addr]int
	// Wrong lists arrivals with another source than the one wanted.
	Wrong []Hit
	// LongestGap is the longest time without an arrival, from the start of
	// the flow to its end (so a flow that stops arriving counts).
	LongestGap time.Duration
	// SendErr is the first error sending, if any.
	SendErr error
}

// StartFlow starts sending from p to dst every interval.
func (c *Cluster) StartFlow(p *Pod, dst netip.AddrPort, interval time.Duration) (*Flow, error) {
	f := &Flow{
		Prefix:   fmt.Sprintf("flow-%s-%d-", p.Name, time.Now().UnixNano()),
		Interval: interval,
		c:        c,
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	long, err := OpenUDP(p, dst)
	if err != nil {
		return nil, err
	}
	f.start = time.Now()
	gone := p.Gone()
	go func() {
		defer close(f.done)
		defer long.Close()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
			case <-f.stop:
			case <-gone:
				// The pod was deleted: its sockets die with it (the
				// long-lived one would keep its namespace alive).
			}
			if stopped(f.stop) || stopped(gone) {
				f.mu.Lock()
				f.ended = time.Now()
				f.mu.Unlock()
				return
			}
			f.mu.Lock()
			n := f.sent
			f.sent++
			f.mu.Unlock()
			payload := []byte(fmt.Sprintf("%s%d", f.Prefix, n))
			var err error
			if n%2 == 0 {
				_, err = long.Write(payload)
			} else {
				var fresh net.Conn
				if fresh, err = OpenUDP(p, dst); err == nil {
					_, err = fresh.Write(payload)
					fresh.Close()
				}
			}
			if err != nil {
				f.mu.Lock()
				if f.err == nil {
					f.err = fmt.Errorf("datagram %d: %w", n, err)
				}
				f.mu.Unlock()
			}
		}
	}()
	return f, nil
}

// Stop ends the flow, waits briefly for datagrams in flight and reports
// what arrived, judged against want.
func (f *Flow) Stop(want netip.Addr) FlowReport {
	close(f.stop)
	<-f.done
	time.Sleep(300 * time.Millisecond)
	f.mu.Lock()
	defer f.mu.Unlock()
	hits := f.c.External.HitsWithPrefix(f.Prefix)
	r := FlowReport{Sent: f.sent, Arrived: len(hits), Sources: map[netip.Addr]int{}, SendErr: f.err}
	last := f.start
	for _, h := range hits {
		r.Sources[h.Source]++
		if h.Source != want {
			r.Wrong = append(r.Wrong, h)
		}
		r.LongestGap = max(r.LongestGap, h.At.Sub(last))
		last = h.At
	}
	r.LongestGap = max(r.LongestGap, f.ended.Sub(last))
	return r
}

// String summarises a report.
func (r FlowReport) String() string {
	return fmt.Sprintf("%d sent, %d arrived, sources %v, longest gap %s", r.Sent, r.Arrived, r.Sources, r.LongestGap.Round(time.Millisecond))
}

func stopped(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
