package allocator

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The keys of kube-vip-cloud-provider's ConfigMap that the allocator reads.
// <scope> is a namespace or "global".
const (
	prefixCIDR       = "cidr-"        // cidr-<scope>: CIDRs, comma-separated
	prefixRange      = "range-"       // range-<scope>: from-to ranges, comma-separated
	prefixAllowShare = "allow-share-" // allow-share-<scope>: strconv.ParseBool
	prefixInterface  = "interface-"   // interface-<scope>: written as kube-vip.io/serviceInterface
	keySearchOrder   = "search-order" // "desc": highest free address first
	keySkipEnds      = "skip-end-ips-in-cidr"
	scopeGlobal      = "global"
)

// Range is an inclusive range of addresses of one family.
type Range struct{ From, To netip.Addr }

func (r Range) contains(a netip.Addr) bool {
	return r.From.Compare(a) <= 0 && a.Compare(r.To) <= 0
}

// Pool is the address pool of one Service's namespace: where its addresses
// come from and how they are chosen.
type Pool struct {
	// Key is the ConfigMap key its addresses come from, e.g. cidr-global;
	// metrics and Events name the pool by it.
	Key string
	// Ranges are sorted, merged and of both families (IPv4 first).
	Ranges []Range
	// Share lets Services of one namespace share an IPv4 address when
	// their ports do not overlap (allow-share-<scope>).
	Share bool
	// Desc hands out the highest free address first (search-order=desc).
	Desc bool
	// Interface is written as kube-vip.io/serviceInterface (interface-<scope>).
	Interface string
}

// has tells whether the pool holds addresses of family f.
func (p Pool) has(f Family) bool {
	for _, r := range p.Ranges {
		if familyOf(r.From) == f {
			return true
		}
	}
	return false
}

// rangesOf is the pool's ranges of family f.
func (p Pool) rangesOf(f Family) []Range {
	var out []Range
	for _, r := range p.Ranges {
		if familyOf(r.From) == f {
			out = append(out, r)
		}
	}
	return out
}

// contains tells whether a lies in the pool.
func (p Pool) contains(a netip.Addr) bool {
	i, _ := slices.BinarySearchFunc(p.Ranges, a, func(r Range, a netip.Addr) int {
		if r.To.Compare(a) < 0 {
			return -1
		}
		if r.From.Compare(a) > 0 {
			return 1
		}
		return 0
	})
	return i < len(p.Ranges) && p.Ranges[i].contains(a)
}

// KeyError is a ConfigMap value the allocator cannot use. Other keys keep
// working; a Service whose pool it is gets no address.
type KeyError struct {
	Key, Value string
	Err        error
}

func (e KeyError) Error() string { return fmt.Sprintf("%s: %q: %v", e.Key, e.Value, e.Err) }

// scoped is what one cidr-<scope> or range-<scope> key holds.
type scoped struct {
	key    string
	ranges []Range
	err    error
}

// Settings is the parsed ConfigMap.
type Settings struct {
	cidrs, ranges map[string]scoped
	share         map[string]bool
	iface         map[string]string
	desc          bool
}

// ParseConfig reads kube-vip-cloud-provider's ConfigMap data. Every value
// it cannot use is returned as a KeyError, and only the pools of that key
// are unusable. nil data (no ConfigMap) has no pools.
func ParseConfig(data map[string]string) (Settings, []KeyError) {
	s := Settings{cidrs: map[string]scoped{}, ranges: map[string]scoped{}, share: map[string]bool{}, iface: map[string]string{}}
	var errs []KeyError
	bad := func(key, value string, err error) { errs = append(errs, KeyError{Key: key, Value: value, Err: err}) }

	skipEnds := false
	if v, ok := data[keySkipEnds]; ok {
		// kube-vip-cloud-provider skips only on the exact string "true".
		switch strings.TrimSpace(v) {
		case "true":
			skipEnds = true
		case "false", "":
		default:
			bad(keySkipEnds, v, fmt.Errorf(`want "true" or "false"`))
		}
	}
	if v, ok := data[keySearchOrder]; ok {
		switch strings.TrimSpace(v) {
		case "desc":
			s.desc = true
		case "asc", "":
		default:
			bad(keySearchOrder, v, fmt.Errorf(`want "asc" or "desc"`))
		}
	}
	for key, value := range data {
		switch {
		case strings.HasPrefix(key, prefixCIDR):
			scope := key[len(prefixCIDR):]
			r, err := parseCIDRs(value, skipEnds)
			if err != nil {
				bad(key, value, err)
			}
			s.cidrs[scope] = scoped{key: key, ranges: r, err: err}
		case strings.HasPrefix(key, prefixRange):
			scope := key[len(prefixRange):]
			r, err := parseRanges(value)
			if err != nil {
				bad(key, value, err)
			}
			s.ranges[scope] = scoped{key: key, ranges: r, err: err}
		case strings.HasPrefix(key, prefixAllowShare):
			b, err := strconv.ParseBool(strings.TrimSpace(value))
			if err != nil {
				bad(key, value, fmt.Errorf("want true or false"))
			}
			s.share[key[len(prefixAllowShare):]] = b
		case strings.HasPrefix(key, prefixInterface):
			s.iface[key[len(prefixInterface):]] = strings.TrimSpace(value)
		}
	}
	slices.SortFunc(errs, func(a, b KeyError) int { return cmp.Compare(a.Key, b.Key) })
	return s, errs
}

// NoPoolError says that no key gives a namespace a pool.
type NoPoolError struct{ Namespace string }

func (e NoPoolError) Error() string {
	return fmt.Sprintf("no address pool for namespace %s (set %s%s, %s%s, %s%s or %s%s)", e.Namespace,
		prefixCIDR, e.Namespace, prefixRange, e.Namespace, prefixCIDR, scopeGlobal, prefixRange, scopeGlobal)
}

// PoolFor is the pool of a namespace: its own (cidr-<ns>, else range-<ns>),
// else the global one (cidr-global, else range-global). A namespace whose
// own key is invalid gets an error, not the global pool.
func (s Settings) PoolFor(namespace string) (Pool, error) {
	level := func(scope string) (scoped, bool) {
		if c, ok := s.cidrs[scope]; ok {
			return c, true
		}
		c, ok := s.ranges[scope]
		return c, ok
	}
	src, ok := level(namespace)
	if !ok {
		src, ok = level(scopeGlobal)
	}
	if !ok {
		return Pool{}, NoPoolError{Namespace: namespace}
	}
	if src.err != nil {
		return Pool{}, fmt.Errorf("address pool %s is invalid: %w", src.key, src.err)
	}
	p := Pool{Key: src.key, Ranges: src.ranges, Desc: s.desc}
	if b, ok := s.share[namespace]; ok {
		p.Share = b
	} else {
		p.Share = s.share[scopeGlobal]
	}
	if i, ok := s.iface[namespace]; ok {
		p.Interface = i
	} else {
		p.Interface = s.iface[scopeGlobal]
	}
	return p, nil
}

// Pools lists every valid pool by key, for the usage metric.
func (s Settings) Pools() []Pool {
	var out []Pool
	for _, m := range []map[string]scoped{s.cidrs, s.ranges} {
		for _, c := range m {
			if c.err == nil {
				out = append(out, Pool{Key: c.key, Ranges: c.ranges, Desc: s.desc})
			}
		}
	}
	slices.SortFunc(out, func(a, b Pool) int { return cmp.Compare(a.Key, b.Key) })
	return out
}

func items(value string) ([]string, error) {
	var out []string
	for _, it := range strings.Split(value, ",") {
		it = strings.TrimSpace(it)
		if it == "" {
			return nil, fmt.Errorf("empty item")
		}
		out = append(out, it)
	}
	return out, nil
}

// plainAddr refuses what the kube-vip.io/loadbalancerIPs parser refuses.
func plainAddr(a netip.Addr) error {
	if a.Is4In6() || a.Zone() != "" {
		return fmt.Errorf("%s: use a plain IPv4 or IPv6 address", a)
	}
	return nil
}

// parseCIDRs reads cidr-<scope>. As in kube-vip-cloud-provider, a prefix
// with host bits set means its network (192.168.0.210/29 is .208-.215),
// and skipEnds drops the first and last address of every IPv4 CIDR
// shorter than /31.
func parseCIDRs(value string, skipEnds bool) ([]Range, error) {
	its, err := items(value)
	if err != nil {
		return nil, err
	}
	var out []Range
	for _, it := range its {
		p, err := netip.ParsePrefix(it)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR", it)
		}
		if err := plainAddr(p.Addr()); err != nil {
			return nil, err
		}
		if p.Addr().Is4() && p.Bits() == 32 && p.Addr().IsUnspecified() {
			return nil, fmt.Errorf("0.0.0.0/32 (kube-vip's DHCP mode) is not supported")
		}
		p = p.Masked()
		r := Range{From: p.Addr(), To: lastOf(p)}
		if skipEnds && p.Addr().Is4() && p.Bits() < 31 {
			r = Range{From: r.From.Next(), To: r.To.Prev()}
		}
		out = append(out, r)
	}
	return merge(out), nil
}

// parseRanges reads range-<scope>: from-to items, each of one family.
func parseRanges(value string) ([]Range, error) {
	its, err := items(value)
	if err != nil {
		return nil, err
	}
	var out []Range
	for _, it := range its {
		from, to, ok := strings.Cut(it, "-")
		if !ok || strings.Contains(to, "-") {
			return nil, fmt.Errorf("%q is not a range (from-to)", it)
		}
		a, err1 := netip.ParseAddr(strings.TrimSpace(from))
		b, err2 := netip.ParseAddr(strings.TrimSpace(to))
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%q is not a range of addresses", it)
		}
		for _, x := range []netip.Addr{a, b} {
			if err := plainAddr(x); err != nil {
				return nil, err
			}
		}
		if a.Is4() != b.Is4() {
			return nil, fmt.Errorf("%q mixes IPv4 and IPv6", it)
		}
		if b.Less(a) {
			return nil, fmt.Errorf("%q ends before it starts", it)
		}
		out = append(out, Range{From: a, To: b})
	}
	return merge(out), nil
}

// lastOf is the last address of a masked prefix.
func lastOf(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// merge sorts ranges and joins those that overlap or touch, as
// kube-vip-cloud-provider's IPSet does: the search walks addresses in
// order, not in the order the ConfigMap lists them.
func merge(rs []Range) []Range {
	slices.SortFunc(rs, func(a, b Range) int { return a.From.Compare(b.From) })
	var out []Range
	for _, r := range rs {
		if n := len(out); n > 0 && familyOf(out[n-1].To) == familyOf(r.From) {
			last := &out[n-1]
			if next := last.To.Next(); !next.IsValid() || r.From.Compare(next) <= 0 {
				if last.To.Less(r.To) {
					last.To = r.To
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}
