package sandbox

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Sample is the set of nodes that held an address at one moment.
type Sample struct {
	At      time.Time
	Holders []string
}

func (s Sample) String() string {
	return s.At.Format("15:04:05.000") + " " + fmt.Sprint(s.Holders)
}

// AddrSamples is what a Sampler saw of one address.
type AddrSamples struct {
	Addr    netip.Addr
	Samples int
	// Double lists the samples with the address on two nodes or more.
	Double []Sample
	// None counts the samples with the address on no node.
	None int
	// Changes lists the samples whose holders differ from the previous
	// sample's, so the address's history: Changes[i].Holders held it from
	// Changes[i].At on. The first sample is not a change.
	Changes []Sample
	// First and Last are the first and last samples.
	First, Last Sample
}

func (a *AddrSamples) String() string {
	return fmt.Sprintf("%s: %d samples, %d holder changes, %d on two nodes or more, %d on none", a.Addr, a.Samples, len(a.Changes), len(a.Double), a.None)
}

// SamplerReport is what a Sampler saw.
type SamplerReport struct {
	Interval time.Duration
	// Rounds counts the rounds that read every node (failed rounds are
	// not samples).
	Rounds int
	// Slowest is the longest round: every node's addresses dumped once.
	Slowest time.Duration
	// Late counts rounds that started more than an interval after the
	// previous one (the machine could not keep up).
	Late int
	// Errors counts rounds in which a node's addresses could not be read;
	// Err is the first such error.
	Errors int
	Err    error
	Addrs  map[netip.Addr]*AddrSamples
}

// Of returns the samples of ip (empty if it was not sampled).
func (r *SamplerReport) Of(ip netip.Addr) *AddrSamples {
	if a, ok := r.Addrs[ip]; ok {
		return a
	}
	return &AddrSamples{Addr: ip}
}

func (r *SamplerReport) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d rounds every %s (slowest %s, %d late, %d failed)", r.Rounds, r.Interval, r.Slowest.Round(time.Microsecond), r.Late, r.Errors)
	ips := make([]netip.Addr, 0, len(r.Addrs))
	for ip := range r.Addrs {
		ips = append(ips, ip)
	}
	slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
	for _, ip := range ips {
		b.WriteString("; ")
		b.WriteString(r.Addrs[ip].String())
	}
	return b.String()
}

// maxListed bounds Double and Changes per address (a sampler left running
// must not grow without bound); counts go on.
const maxListed = 10000

// record adds one round: holders[ip] are the nodes that held ip at at.
func (r *SamplerReport) record(at time.Time, holders map[netip.Addr][]string) {
	r.Rounds++
	for ip, a := range r.Addrs {
		h := holders[ip]
		s := Sample{At: at, Holders: h}
		a.Samples++
		switch {
		case len(h) == 0:
			a.None++
		case len(h) > 1 && len(a.Double) < maxListed:
			a.Double = append(a.Double, s)
		}
		if a.Samples == 1 {
			a.First = s
		} else if !slices.Equal(a.Last.Holders, h) && len(a.Changes) < maxListed {
			a.Changes = append(a.Changes, s)
		}
		a.Last = s
	}
}

// Sampler records, every interval, which nodes hold each of a set of
// addresses (full-length, any interface; see Holders).
type Sampler struct {
	c    *Cluster
	ips  []netip.Addr
	stop chan struct{}
	done chan struct{}
	once sync.Once

	mu     sync.Mutex
	report SamplerReport
}

// StartSampler samples ips every interval until Stop, or until limit has
// passed (0 means 15 minutes): a sampler left running ends on its own.
func (c *Cluster) StartSampler(interval, limit time.Duration, ips ...netip.Addr) *Sampler {
	if limit <= 0 {
		limit = 15 * time.Minute
	}
	s := &Sampler{c: c, ips: slices.Clone(ips), stop: make(chan struct{}), done: make(chan struct{})}
	s.report = SamplerReport{Interval: interval, Addrs: map[netip.Addr]*AddrSamples{}}
	for _, ip := range ips {
		s.report.Addrs[ip] = &AddrSamples{Addr: ip}
	}
	go s.run(interval, limit)
	return s
}

func (s *Sampler) run(interval, limit time.Duration) {
	defer close(s.done)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	end := time.After(limit)
	var prev time.Time
	for {
		start := time.Now()
		holders, err := s.round()
		took := time.Since(start)
		s.mu.Lock()
		if err != nil {
			s.report.Errors++
			if s.report.Err == nil {
				s.report.Err = err
			}
		} else {
			s.report.record(start, holders)
		}
		s.report.Slowest = max(s.report.Slowest, took)
		if !prev.IsZero() && start.Sub(prev) > 2*interval {
			s.report.Late++
		}
		s.mu.Unlock()
		prev = start
		select {
		case <-s.stop:
			return
		case <-end:
			return
		case <-tick.C:
		}
	}
}

// round reads every node's addresses once.
func (s *Sampler) round() (map[netip.Addr][]string, error) {
	holders := make(map[netip.Addr][]string, len(s.ips))
	for _, n := range s.c.Nodes {
		as, err := n.addrs("")
		if err != nil {
			return nil, err
		}
		have := fullLength(as, false)
		for _, ip := range s.ips {
			if slices.Contains(have, ip) {
				holders[ip] = append(holders[ip], n.Name)
			}
		}
	}
	return holders, nil
}

// Report returns a copy of what the sampler saw so far.
func (s *Sampler) Report() SamplerReport {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.report
	r.Addrs = make(map[netip.Addr]*AddrSamples, len(s.report.Addrs))
	for ip, a := range s.report.Addrs {
		cp := *a
		cp.Double = slices.Clone(a.Double)
		cp.Changes = slices.Clone(a.Changes)
		r.Addrs[ip] = &cp
	}
	return r
}

// Stop ends sampling (it is safe to call more than once) and returns what
// the sampler saw.
func (s *Sampler) Stop() SamplerReport {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.Report()
}
