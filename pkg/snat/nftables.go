package snat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"
)

// What the nftables backend owns: one table named TableName in each of the
// ip and ip6 families, nothing else. Per family (ip6: ip6 and ipv6_addr),
// with Config's defaults, a tunnel device evx0 and tunnel port 4789:
//
//	table ip egressvip {
//		set exclude { type ipv4_addr; flags interval; }     # Datapath.Exclude
//		set pods { type ipv4_addr; }                        # pods of every rule
//		set gate-cidrs { type ipv4_addr; flags interval; }  # Gate.PodCIDRs
//		set gate-known { type ipv4_addr; }                  # Gate.Known
//		set tunnel-guard { type ipv4_addr; flags interval; }
//		set transit { type ipv4_addr; flags interval; }     # Datapath.Transit
//		set fenced { type ipv4_addr; }                      # Datapath.Fenced
//		map pre-ports { type ipv4_addr . inet_proto . inet_service : verdict; }
//		map pre-all { type ipv4_addr : verdict; }
//		map snat-chains { type ipv4_addr : verdict; }
//		map snat-ports { type ipv4_addr . inet_proto . inet_service : ipv4_addr; }
//		map snat-all { type ipv4_addr : ipv4_addr; }
//		chain prerouting {
//			type filter hook prerouting priority filter; policy accept;   # after kube-proxy's DNAT
//			udp dport 4789 ip saddr @tunnel-guard drop
//			ip saddr @pods iifname != "evx0" fib saddr . iif oif missing drop
//			ip daddr @exclude return
//			ct original ip daddr @exclude return
//			ip saddr @gate-cidrs ip saddr != @gate-known ip saddr != @pods drop
//			iifname @node-ifaces ip saddr @transit ip saddr != @pods fib daddr type != local drop
//			ip saddr . meta l4proto . th dport vmap @pre-ports   # drop | goto steer | accept
//			ip saddr vmap @pre-all                               # drop | goto steer | goto pre-<digest>
//		}
//		chain steer { meta mark set meta mark | 0x1000; }
//		chain postrouting {
//			type nat hook postrouting priority srcnat - 10; policy accept;
//			meta mark & 0x1000 == 0x1000 snat to ip saddr       # steered: no NAT on this node
//			ip daddr @exclude return
//			ct original ip daddr @exclude return
//			ip saddr vmap @snat-chains                           # goto snat-<digest>
//			snat to ip saddr . meta l4proto . th dport map @snat-ports
//			snat to ip saddr map @snat-all
//		}
//		chain forward {                                          # with a tunnel device
//			type filter hook forward priority filter; policy accept;
//			oifname "evx0" meta mark & 0x1000 == 0x1000 tcp flags syn / syn,rst tcp option maxseg size set rt mtu
//		}
//		chain fence {
//			type filter hook postrouting priority srcnat + 10; policy accept;
//			ip saddr @fenced fib saddr type != local drop
//			ct direction original meta mark & 0x1000 == 0x1000 ct mark set ct mark | 0x1000
//			ct direction original ct mark & 0x1000 == 0x1000 meta mark & 0x1000 == 0 drop
//		}
//		chain pre-<digest> { ip daddr { 198.51.100.0/24 } ip daddr != { 198.51.100.9 } meta l4proto . th dport { udp . 5060 } goto steer; ... }
//		chain snat-<digest> { ip daddr { 198.51.100.0/24 } snat to 203.0.113.10; ... }
//	}
//
// Pods whose rules have no destination prefix (the common case) are map
// elements: a new connection costs a few set and map lookups whatever the
// number of Services. A pod with prefixes in a rule jumps, by one map
// lookup, to a chain holding its rules in order, named after their digest
// and shared by the pods with equal rules. Every map element and chain rule
// carries its Service ("namespace/name") as comment.
//
// Anti-spoofing: a packet whose source is the pod of any rule (SNAT, also
// Remote, steer, hold) is dropped unless it arrived through the interface
// the node routes that address to (strict reverse path), or on the tunnel
// device. So a Remote pod's traffic steered over the node network must
// arrive where the node routes the pod's range (true of routed, host-gw
// style pod networks); with an overlay CNI, steer through the tunnel.
// The gate treats the pods of rules as known.
//
// The nat chain's priority (NFTPriority, 90) runs it before iptables' nat
// POSTROUTING and kube-proxy's nftables nat-postrouting chain (both srcnat,
// 100): the kernel stops at the first nat chain that sets up a source
// translation, so no rule that iptables, kube-proxy or a CNI adds at srcnat
// priority, at any position, can come first. Steered packets get a null
// SNAT there, which sets up their translation (none) so that no later nat
// chain masquerades them. The fence runs after every translation (the
// kernel rewrites addresses at srcnat, 100, whatever its nat chains'
// priorities).
const (
	// TableName is the nftables backend's table in the ip and the ip6
	// family.
	TableName = "egressvip"
	// NFTPriority is the priority of the nat postrouting base chain:
	// srcnat - 10, which knftables writes as 90.
	NFTPriority = knftables.SNATPriority + "-10"
	// FencePriority is the priority of the fence: srcnat + 10 (110), after
	// the source translation.
	FencePriority = knftables.SNATPriority + "+10"
	// TableComment is the comment of the table.
	TableComment = "egressvip: egress datapath"

	nftPrerouting  = "prerouting"
	nftPostrouting = "postrouting"
	nftSteer       = "steer"
	nftForward     = "forward"
	nftFence       = "fence"

	nftExclude    = "exclude"
	nftPods       = "pods"
	nftGateCIDRs  = "gate-cidrs"
	nftGateKnown  = "gate-known"
	nftGuard      = "tunnel-guard"
	nftTransit    = "transit"
	nftNodeIfaces = "node-ifaces"
	nftFenced     = "fenced"
	nftPrePorts   = "pre-ports"
	nftPreAll     = "pre-all"
	nftSNATChain  = "snat-chains"
	nftSNATPorts  = "snat-ports"
	nftSNATAll    = "snat-all"

	// Prefixes of the clause chains, followed by a digest.
	nftPreChainPrefix  = "pre-"
	nftSNATChainPrefix = "snat-"
)

// Comments of egressvip's own rules; Services are never named like this.
const (
	// ExcludeComment marks the rules that return for excluded
	// destinations.
	ExcludeComment     = "egressvip: excluded destination"
	antiSpoofComment   = "egressvip: anti-spoofing"
	guardComment       = "egressvip: tunnel guard"
	gateComment        = "egressvip: gate"
	transitComment     = "egressvip: other nodes' pods, not SNATed here"
	steeredComment     = "egressvip: steered, no NAT here"
	mssComment         = "egressvip: MSS clamp of steered SYNs"
	fenceComment       = "egressvip: fence"
	steeredConnComment = "egressvip: steered connections stay steered"
)

// NFTables is the kernel side of one family's egressvip table: knftables for
// transactions and reads, plus the two reads the cheap check needs. The real
// one runs the nft binary in the network namespace of the calling thread.
type NFTables interface {
	knftables.Interface
	// Fingerprint returns a digest of everything the table holds: equal
	// for equal contents, different after any change; an error wrapping
	// ErrNoTable when it does not exist.
	Fingerprint(ctx context.Context) ([]byte, error)
	// Generation returns the nftables ruleset generation, which every
	// committed transaction changes (see nftGeneration).
	Generation() (uint32, error)
}

func knftFamily(f Family) knftables.Family {
	if f == IPv6 {
		return knftables.IPv6Family
	}
	return knftables.IPv4Family
}

// realNFT is NFTables on the nft binary.
type realNFT struct {
	knftables.Interface
	family knftables.Family
	table  string
}

func newRealNFT(f Family, table string) (*realNFT, error) {
	nft, err := knftables.New(knftFamily(f), table)
	if err != nil {
		return nil, err
	}
	return &realNFT{Interface: nft, family: knftFamily(f), table: table}, nil
}

// ErrNoTable is the error of a table that does not exist (NFTables
// implementations wrap it; knftables' own not-found errors cannot be made
// outside knftables).
var ErrNoTable = errors.New("no such table")

// isNotFound says whether err means that the table (or an object in it)
// does not exist.
func isNotFound(err error) bool {
	return errors.Is(err, ErrNoTable) || knftables.IsNotFound(err)
}

// Fingerprint digests the table's netlink dumps (see nftFingerprint): a few
// milliseconds for 5,000 elements, where `nft list table` takes tens.
func (n *realNFT) Fingerprint(context.Context) ([]byte, error) {
	fam := uint8(unix.NFPROTO_IPV4)
	if n.family == knftables.IPv6Family {
		fam = unix.NFPROTO_IPV6
	}
	return nftFingerprint(fam, n.table)
}

func (n *realNFT) Generation() (uint32, error) { return nftGeneration() }

// datapathOptions are the parts of Config the rules are written with.
type datapathOptions struct {
	mark         uint32
	tunnelDevice string
	tunnelPort   uint16
}

func (o datapathOptions) markString() string { return "0x" + strconv.FormatUint(uint64(o.mark), 16) }

// nftElem is one set or map element: key components, value and comment.
type nftElem struct {
	key     []string
	value   string
	comment string
}

func (e nftElem) same(o nftElem) bool {
	return e.value == o.value && e.comment == o.comment && slices.Equal(e.key, o.key)
}

// nftRule is one rule of a clause chain.
type nftRule struct {
	rule, comment string
}

// nftContent is what the table of one family holds beyond its fixed
// schema, as written.
type nftContent struct {
	// elems are the elements of each set and map, by joined key.
	elems map[string]map[string]nftElem
	// chains are the clause chains.
	chains map[string][]nftRule
}

func (c *nftContent) equal(o *nftContent) bool {
	return maps.EqualFunc(c.elems, o.elems, func(a, b map[string]nftElem) bool { return maps.EqualFunc(a, b, nftElem.same) }) &&
		maps.EqualFunc(c.chains, o.chains, slices.Equal)
}

func (c *nftContent) add(set string, e nftElem) {
	if c.elems[set] == nil {
		c.elems[set] = map[string]nftElem{}
	}
	c.elems[set][strings.Join(e.key, " . ")] = e
}

// nftSet describes one set or map of the schema.
type nftSet struct {
	name string
	// typ is the type; "ADDR" stands for the family's address type.
	typ      string
	interval bool
	isMap    bool
	comment  string
}

// nftSets are the sets and maps of the full table, in the order they are
// written.
var nftSets = []nftSet{
	{name: nftExclude, typ: "ADDR", interval: true, comment: "never egressed: pod, Service CIDRs, nodes, API server"},
	{name: nftPods, typ: "ADDR", comment: "pods of egress rules: anti-spoofing"},
	{name: nftGateCIDRs, typ: "ADDR", interval: true, comment: "gate: pod CIDRs"},
	{name: nftGateKnown, typ: "ADDR", comment: "gate: known pods"},
	{name: nftGuard, typ: "ADDR", interval: true, comment: "no VXLAN from these: pod CIDRs"},
	{name: nftTransit, typ: "ADDR", interval: true, comment: "other nodes' pods: forwarded only when SNATed here"},
	{name: nftFenced, typ: "ADDR", comment: "sources that leave only while local"},
	{name: nftNodeIfaces, typ: "ifname", comment: "interfaces other nodes' traffic arrives on: no anti-spoofing"},
	{name: nftPrePorts, typ: "ADDR . inet_proto . inet_service : verdict", isMap: true, comment: "pod . protocol . destination port : steer, hold or not"},
	{name: nftPreAll, typ: "ADDR : verdict", isMap: true, comment: "pod : steer, hold or its clause chain"},
	{name: nftSNATChain, typ: "ADDR : verdict", isMap: true, comment: "pod : its clause chain"},
	{name: nftSNATPorts, typ: "ADDR . inet_proto . inet_service : ADDR", isMap: true, comment: "pod . protocol . destination port : LoadBalancer IP"},
	{name: nftSNATAll, typ: "ADDR : ADDR", isMap: true, comment: "pod : LoadBalancer IP"},
}

// fenceSets is the schema of the iptables backends' fence table.
var fenceSets = func() []nftSet {
	s, _ := setSpec(nftSets, nftFenced)
	return []nftSet{s}
}()

func setSpec(sets []nftSet, name string) (nftSet, bool) {
	for _, s := range sets {
		if s.name == name {
			return s, true
		}
	}
	return nftSet{}, false
}

// nftWriter writes a table in both families: the nftables backend's full
// table, or (fenceOnly) the fence that the iptables backends keep in an
// nftables table of their own.
type nftWriter struct {
	table     string
	comment   string
	fenceOnly bool
	opts      datapathOptions
	tables    [2]NFTables
	fam       [2]nftState
	// commits counts the transactions this writer committed.
	commits int
}

// nftState is what the writer knows of one family's table.
type nftState struct {
	// content is what the table holds; nil when unknown, which makes the
	// next write replace the whole table.
	content *nftContent
	// gen is a ruleset generation at which the table was known to hold
	// content (genOK): after our own commit when nobody else committed in
	// between, or when its fingerprint matched ref.
	gen   uint32
	genOK bool
	// ref is the table's fingerprint while it held content, taken right
	// after the write; nil when someone committed meanwhile.
	ref []byte
}

func (st *nftState) forget() { *st = nftState{} }

func newNFTWriter(table string, fenceOnly bool, opts datapathOptions, tables [2]NFTables) (*nftWriter, error) {
	w := &nftWriter{table: table, comment: TableComment, fenceOnly: fenceOnly, opts: opts, tables: tables}
	if fenceOnly {
		w.comment = "egressvip: fence of the " + strings.TrimPrefix(table, TableName+"-") + " backend"
	}
	for _, f := range Families {
		if w.tables[f] != nil {
			continue
		}
		t, err := newRealNFT(f, table)
		if err != nil {
			return nil, fmt.Errorf("needs a working nft binary (%w)", err)
		}
		w.tables[f] = t
	}
	return w, nil
}

func (w *nftWriter) sets() []nftSet {
	if w.fenceOnly {
		return fenceSets
	}
	return nftSets
}

// ipWords returns the family's protocol keyword and address type.
func ipWords(f Family) (string, string) {
	if f == IPv6 {
		return "ip6", "ipv6_addr"
	}
	return "ip", "ipv4_addr"
}

// schema returns the objects and rules of one family's table, without
// elements and clause chains.
func (w *nftWriter) schema(f Family) ([]knftables.Object, []*knftables.Rule) {
	ip, addr := ipWords(f)
	var objs []knftables.Object
	for _, s := range w.sets() {
		typ := strings.ReplaceAll(s.typ, "ADDR", addr)
		if s.isMap {
			objs = append(objs, &knftables.Map{Name: s.name, Type: typ, Comment: knftables.PtrTo(s.comment)})
			continue
		}
		set := &knftables.Set{Name: s.name, Type: typ, Comment: knftables.PtrTo(s.comment)}
		if s.interval {
			set.Flags = []knftables.SetFlag{knftables.IntervalFlag}
		}
		objs = append(objs, set)
	}
	rule := func(chain, rule, comment string) *knftables.Rule {
		return &knftables.Rule{Chain: chain, Rule: rule, Comment: knftables.PtrTo(comment)}
	}
	fence := &knftables.Chain{
		Name:     nftFence,
		Type:     knftables.PtrTo(knftables.FilterType),
		Hook:     knftables.PtrTo(knftables.PostroutingHook),
		Priority: knftables.PtrTo(knftables.BaseChainPriority(FencePriority)),
	}
	mark := w.opts.markString()
	fenceRules := []*knftables.Rule{
		rule(nftFence, ip+" saddr @"+nftFenced+" fib saddr type != local drop", fenceComment),
		// A connection is remembered as steered; once its packets are
		// no longer steered (this node now SNATs the pod, or holds
		// it), its conntrack entry's binding (none) would send them
		// with the pod's address: dropped until the entry is deleted.
		rule(nftFence, "ct direction original meta mark & "+mark+" == "+mark+" ct mark set ct mark | "+mark, steeredConnComment),
		rule(nftFence, "ct direction original ct mark & "+mark+" == "+mark+" meta mark & "+mark+" == 0 drop", steeredConnComment),
	}
	steered := rule(nftPostrouting, "meta mark & "+mark+" == "+mark+" snat to "+ip+" saddr", steeredComment)
	postrouting := &knftables.Chain{
		Name:     nftPostrouting,
		Type:     knftables.PtrTo(knftables.NATType),
		Hook:     knftables.PtrTo(knftables.PostroutingHook),
		Priority: knftables.PtrTo(knftables.BaseChainPriority(NFTPriority)),
	}
	if w.fenceOnly {
		// The iptables backends' steered packets get their null SNAT
		// here too: an iptables ACCEPT sets up no translation, so a
		// MASQUERADE of the other iptables flavour (a CNI's) would
		// still rewrite them.
		return append(objs, fence, postrouting), append(fenceRules, steered)
	}
	objs = append(objs,
		&knftables.Chain{Name: nftSteer},
		&knftables.Chain{
			Name:     nftPrerouting,
			Type:     knftables.PtrTo(knftables.FilterType),
			Hook:     knftables.PtrTo(knftables.PreroutingHook),
			Priority: knftables.PtrTo(knftables.FilterPriority),
		},
		postrouting,
		fence,
	)
	var rules []*knftables.Rule
	if w.opts.tunnelPort != 0 {
		rules = append(rules, rule(nftPrerouting, "udp dport "+strconv.Itoa(int(w.opts.tunnelPort))+" "+ip+" saddr @"+nftGuard+" drop", guardComment))
	}
	rules = append(rules,
		rule(nftPrerouting, ip+" saddr @"+nftPods+" iifname != @"+nftNodeIfaces+" fib saddr . iif oif missing drop", antiSpoofComment),
		rule(nftPrerouting, ip+" daddr @"+nftExclude+" return", ExcludeComment),
		rule(nftPrerouting, "ct original "+ip+" daddr @"+nftExclude+" return", ExcludeComment),
		rule(nftPrerouting, ip+" saddr @"+nftGateCIDRs+" "+ip+" saddr != @"+nftGateKnown+" "+ip+" saddr != @"+nftPods+" drop", gateComment),
		rule(nftPrerouting, "iifname @"+nftNodeIfaces+" "+ip+" saddr @"+nftTransit+" "+ip+" saddr != @"+nftPods+" fib daddr type != local drop", transitComment),
		rule(nftPrerouting, ip+" saddr . meta l4proto . th dport vmap @"+nftPrePorts, "egressvip: steer or hold by pod and destination port"),
		rule(nftPrerouting, ip+" saddr vmap @"+nftPreAll, "egressvip: steer or hold by pod"),
		rule(nftSteer, "meta mark set meta mark | "+mark, "egressvip: steering mark"),
		steered,
		rule(nftPostrouting, ip+" daddr @"+nftExclude+" return", ExcludeComment),
		rule(nftPostrouting, "ct original "+ip+" daddr @"+nftExclude+" return", ExcludeComment),
		rule(nftPostrouting, ip+" saddr vmap @"+nftSNATChain, "egressvip: SNAT by pod and destination prefix"),
		rule(nftPostrouting, "snat to "+ip+" saddr . meta l4proto . th dport map @"+nftSNATPorts, "egressvip: SNAT by pod and destination port"),
		rule(nftPostrouting, "snat to "+ip+" saddr map @"+nftSNATAll, "egressvip: SNAT by pod"),
	)
	rules = append(rules, fenceRules...)
	if w.opts.tunnelDevice != "" {
		objs = append(objs, &knftables.Chain{
			Name:     nftForward,
			Type:     knftables.PtrTo(knftables.FilterType),
			Hook:     knftables.PtrTo(knftables.ForwardHook),
			Priority: knftables.PtrTo(knftables.FilterPriority),
		})
		rules = append(rules, rule(nftForward, `oifname "`+w.opts.tunnelDevice+`" meta mark & `+mark+" == "+mark+
			" tcp flags syn / syn,rst tcp option maxseg size set rt mtu", mssComment))
	}
	return objs, rules
}

// render computes the table content of a family's compiled state.
func (w *nftWriter) render(f Family, c *compiled) *nftContent {
	out := &nftContent{elems: map[string]map[string]nftElem{}, chains: map[string][]nftRule{}}
	addrs := func(set string, as []netip.Addr) {
		for _, a := range as {
			out.add(set, nftElem{key: []string{a.String()}})
		}
	}
	prefixes := func(set string, ps []netip.Prefix) {
		for _, p := range minimalPrefixes(ps) {
			out.add(set, nftElem{key: []string{p.String()}})
		}
	}
	addrs(nftFenced, c.fenced)
	if w.fenceOnly {
		return out
	}
	prefixes(nftExclude, c.exclude)
	addrs(nftPods, c.pods)
	for _, i := range c.nodeIfaces {
		out.add(nftNodeIfaces, nftElem{key: []string{`"` + i + `"`}})
	}
	prefixes(nftGateCIDRs, c.gateCIDRs)
	addrs(nftGateKnown, c.known)
	prefixes(nftTransit, c.transit)
	if w.opts.tunnelPort != 0 {
		prefixes(nftGuard, c.guard)
	}
	ip, _ := ipWords(f)
	for _, pod := range c.pods {
		p := c.plans[pod]
		ps := pod.String()
		if p.digest != "" {
			if p.has(kindSteer) || p.has(kindHold) {
				out.add(nftPreAll, nftElem{key: []string{ps}, value: "goto " + nftPreChainPrefix + p.digest, comment: p.chain[0].service})
			}
			if p.has(kindSNAT) {
				out.add(nftSNATChain, nftElem{key: []string{ps}, value: "goto " + nftSNATChainPrefix + p.digest, comment: p.chain[0].service})
			}
			continue
		}
		if p.all.kind == kindSNAT {
			out.add(nftSNATAll, nftElem{key: []string{ps}, value: p.all.source.String(), comment: p.all.service})
		}
		vAll := preVerdict(p.all.kind)
		if vAll != "" {
			out.add(nftPreAll, nftElem{key: []string{ps}, value: vAll, comment: p.all.service})
		}
		for port, e := range p.ports {
			key := []string{ps, strconv.Itoa(int(protoNumbers[port.Protocol])), strconv.Itoa(int(port.Port))}
			if e.kind == kindSNAT {
				out.add(nftSNATPorts, nftElem{key: key, value: e.source.String(), comment: e.service})
			}
			if v := preVerdict(e.kind); v != vAll {
				if v == "" {
					v = "accept"
				}
				out.add(nftPrePorts, nftElem{key: key, value: v, comment: e.service})
			}
		}
	}
	for digest, chain := range c.chains() {
		lastPre, lastSNAT := -1, -1
		for i, cl := range chain {
			if cl.kind == kindSNAT {
				lastSNAT = i
			} else {
				lastPre = i
			}
		}
		// Prerouting: SNAT clauses accept (their packets are SNATed in
		// postrouting), the others mark or drop; up to the last one
		// that does something here.
		for _, cl := range chain[:lastPre+1] {
			verdict := map[kind]string{kindSNAT: "accept", kindSteer: "goto " + nftSteer, kindHold: "drop"}[cl.kind]
			name := nftPreChainPrefix + digest
			out.chains[name] = append(out.chains[name], nftRule{rule: nftMatch(ip, cl) + verdict, comment: cl.service})
		}
		// Postrouting: up to the last SNAT clause; the others return
		// (their packets never come here unmarked).
		for _, cl := range chain[:lastSNAT+1] {
			verdict := "return"
			if cl.kind == kindSNAT {
				verdict = "snat to " + cl.source.String()
			}
			name := nftSNATChainPrefix + digest
			out.chains[name] = append(out.chains[name], nftRule{rule: nftMatch(ip, cl) + verdict, comment: cl.service})
		}
	}
	return out
}

// preVerdict is the prerouting verdict of a kind: "" for none and SNAT,
// which prerouting leaves alone.
func preVerdict(k kind) string {
	switch k {
	case kindSteer:
		return "goto " + nftSteer
	case kindHold:
		return "drop"
	}
	return ""
}

// nftMatch returns the matches of a clause's filter, each followed by a
// space: destination prefixes allowed and denied, protocol and port.
func nftMatch(ip string, c clause) string {
	var b strings.Builder
	join := func(ps []netip.Prefix) string {
		s := make([]string, len(ps))
		for i, p := range ps {
			s[i] = p.String()
		}
		return "{ " + strings.Join(s, ", ") + " } "
	}
	if len(c.allow) > 0 {
		b.WriteString(ip + " daddr " + join(c.allow))
	}
	if len(c.deny) > 0 {
		b.WriteString(ip + " daddr != " + join(c.deny))
	}
	if len(c.ports) > 0 {
		s := make([]string, len(c.ports))
		for i, p := range c.ports {
			s[i] = string(p.Protocol) + " . " + strconv.Itoa(int(p.Port))
		}
		b.WriteString("meta l4proto . th dport { " + strings.Join(s, ", ") + " } ")
	}
	return b.String()
}

// write makes the table of family f hold c in one transaction: only the
// changed elements and chains when the table still verifiably holds what
// the last write left (same generation, or same fingerprint), else the
// whole table replaced (deleted and re-created, atomically). A transaction
// that fails on a verified table leaves it verified: the failure was its
// own, and the next write diffs again.
func (w *nftWriter) write(ctx context.Context, f Family, c *compiled) error {
	t, st := w.tables[f], &w.fam[f]
	want := w.render(f, c)
	g0, gerr := t.Generation()
	if st.content != nil && !w.intact(ctx, f, g0, gerr) {
		// Someone changed the table since it was last verified: a diff
		// would keep their change.
		st.forget()
	}
	if st.content != nil && st.content.equal(want) {
		return nil
	}
	var err error
	if st.content != nil {
		tx := t.NewTransaction()
		w.diff(tx, st.content, want)
		genOK, ref := st.genOK, st.ref
		if err = w.run(ctx, f, tx, g0, gerr); err == nil {
			st.content = want
			return nil
		}
		if g1, err1 := t.Generation(); gerr == nil && err1 == nil && g1 == g0 {
			// Nothing was committed: the table is as it was.
			st.genOK, st.ref = genOK, ref
			return fmt.Errorf("write table %s %s: %w", knftFamily(f), w.table, err)
		}
	}
	// Unknown state, or the diff did not apply: replace the table.
	g0, gerr = t.Generation()
	tx := t.NewTransaction()
	w.replace(tx, f, want)
	if err = w.run(ctx, f, tx, g0, gerr); err != nil {
		st.forget()
		return fmt.Errorf("write table %s %s: %w", knftFamily(f), w.table, err)
	}
	st.content = want
	return nil
}

// intact says whether family f's table still holds content at generation
// g: the generation it was verified at, or the reference fingerprint.
func (w *nftWriter) intact(ctx context.Context, f Family, g uint32, gerr error) bool {
	t, st := w.tables[f], &w.fam[f]
	if gerr == nil && st.genOK && g == st.gen {
		return true
	}
	if st.ref == nil {
		return false
	}
	sum, err := t.Fingerprint(ctx)
	return err == nil && bytes.Equal(sum, st.ref)
}

// run runs tx and records whether the table now verifiably holds what tx
// wrote: the generation moved from g0 (read before the state tx starts
// from was known) by exactly our commit. Then it takes the reference
// fingerprint for later checks, if nobody commits meanwhile (a commit by
// someone else in either window leaves no reference, and the next check
// fails, which rewrites the table).
func (w *nftWriter) run(ctx context.Context, f Family, tx *knftables.Transaction, g0 uint32, gerr error) error {
	t, st := w.tables[f], &w.fam[f]
	st.genOK, st.ref = false, nil
	if err := t.Run(ctx, tx); err != nil {
		return err
	}
	w.commits++
	if gerr != nil {
		return nil
	}
	g1, err := t.Generation()
	if err != nil || g1 != g0+1 {
		return nil
	}
	st.gen, st.genOK = g1, true
	if sum, err := t.Fingerprint(ctx); err == nil {
		if g2, err := t.Generation(); err == nil && g2 == g1 {
			st.ref = sum
		}
	}
	return nil
}

func (w *nftWriter) element(set string, e nftElem) *knftables.Element {
	spec, _ := setSpec(w.sets(), set)
	el := &knftables.Element{Key: e.key}
	if spec.isMap {
		el.Map = set
		el.Value = []string{e.value}
	} else {
		el.Set = set
	}
	if e.comment != "" {
		el.Comment = knftables.PtrTo(e.comment)
	}
	return el
}

func addChain(tx *knftables.Transaction, name string, rules []nftRule) {
	tx.Add(&knftables.Chain{Name: name})
	for _, r := range rules {
		tx.Add(&knftables.Rule{Chain: name, Rule: r.rule, Comment: knftables.PtrTo(r.comment)})
	}
}

// replace adds to tx the whole table: deleted if it exists, then created
// with its schema, clause chains and elements.
func (w *nftWriter) replace(tx *knftables.Transaction, f Family, c *nftContent) {
	tx.Add(&knftables.Table{Comment: knftables.PtrTo(w.comment)})
	tx.Delete(&knftables.Table{})
	tx.Add(&knftables.Table{Comment: knftables.PtrTo(w.comment)})
	objs, rules := w.schema(f)
	for _, o := range objs {
		tx.Add(o)
	}
	for _, name := range slices.Sorted(maps.Keys(c.chains)) {
		addChain(tx, name, c.chains[name])
	}
	for _, r := range rules {
		tx.Add(r)
	}
	for _, s := range w.sets() {
		for _, k := range slices.Sorted(maps.Keys(c.elems[s.name])) {
			tx.Add(w.element(s.name, c.elems[s.name][k]))
		}
	}
}

// diff adds to tx what turns the table from old into c: new clause chains
// first (elements jump to them), then per set or map the elements that
// went or changed are deleted and the new and changed ones added (an
// interval set that changed is rewritten whole), then the clause chains
// nothing uses any more are deleted.
func (w *nftWriter) diff(tx *knftables.Transaction, old, c *nftContent) {
	for _, name := range slices.Sorted(maps.Keys(c.chains)) {
		before, ok := old.chains[name]
		switch {
		case !ok:
			addChain(tx, name, c.chains[name])
		case !slices.Equal(before, c.chains[name]):
			tx.Flush(&knftables.Chain{Name: name})
			for _, r := range c.chains[name] {
				tx.Add(&knftables.Rule{Chain: name, Rule: r.rule, Comment: knftables.PtrTo(r.comment)})
			}
		}
	}
	for _, s := range w.sets() {
		before, after := old.elems[s.name], c.elems[s.name]
		if s.interval {
			if !maps.EqualFunc(before, after, nftElem.same) {
				tx.Flush(&knftables.Set{Name: s.name})
				for _, k := range slices.Sorted(maps.Keys(after)) {
					tx.Add(w.element(s.name, after[k]))
				}
			}
			continue
		}
		// Only the changes are sorted (for a readable, stable transaction).
		var gone, added []string
		for k, b := range before {
			if e, ok := after[k]; !ok || !e.same(b) {
				gone = append(gone, k)
			}
		}
		for k, e := range after {
			if b, ok := before[k]; !ok || !e.same(b) {
				added = append(added, k)
			}
		}
		slices.Sort(gone)
		slices.Sort(added)
		for _, k := range gone {
			el := w.element(s.name, before[k])
			el.Value, el.Comment = nil, nil
			tx.Delete(el)
		}
		for _, k := range added {
			tx.Add(w.element(s.name, after[k]))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(old.chains)) {
		if _, ok := c.chains[name]; !ok {
			tx.Flush(&knftables.Chain{Name: name})
			tx.Delete(&knftables.Chain{Name: name})
		}
	}
}

// check compares the tables of fams with what the last write left: the
// ruleset generation first (one netlink round trip); only when someone
// committed anything since, the table's fingerprint with the one taken
// right after the write.
func (w *nftWriter) check(ctx context.Context, fams []Family) (bool, error) {
	for _, f := range fams {
		t, st := w.tables[f], &w.fam[f]
		if st.content == nil {
			return false, nil
		}
		g, gerr := t.Generation()
		if gerr == nil && st.genOK && g == st.gen {
			continue
		}
		if st.ref == nil {
			// Someone committed while we wrote: nothing to compare with.
			return false, model.ErrUnverified
		}
		sum, err := t.Fingerprint(ctx)
		if isNotFound(err) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if !bytes.Equal(sum, st.ref) {
			return false, nil
		}
		if gerr == nil {
			if g2, err := t.Generation(); err == nil && g2 == g {
				st.gen, st.genOK = g, true
			}
		}
	}
	return true, nil
}

// seed reads what family f's table holds. When it is still exactly what the
// last write left (no commit since, or its fingerprint matches), keep is
// true and nothing else is read. Otherwise the elements are read back into
// what they do to each pod, and the next write replaces the table.
func (w *nftWriter) seed(ctx context.Context, f Family) (kernelState, bool, error) {
	t, st := w.tables[f], &w.fam[f]
	if st.content != nil {
		g, gerr := t.Generation()
		if w.intact(ctx, f, g, gerr) {
			if !st.genOK || g != st.gen {
				// Verified by fingerprint: remember the generation, if
				// nobody committed meanwhile.
				st.genOK = false
				if g2, err := t.Generation(); gerr == nil && err == nil && g2 == g {
					st.gen, st.genOK = g, true
				}
			}
			return kernelState{}, true, nil
		}
	}
	st.forget()
	if w.fenceOnly {
		return kernelState{}, false, nil
	}
	if _, err := t.Fingerprint(ctx); isNotFound(err) {
		// No table (deleted by hand, or never written): nothing to read,
		// and no nft run per set to find that out.
		return kernelState{}, false, nil
	}
	ks, err := nftRead(ctx, t)
	return ks, false, err
}

// nftRead reads the elements of a family's table back into what they do
// to each pod, and the exclusions. A missing table, set or map reads as
// empty.
func nftRead(ctx context.Context, t NFTables) (kernelState, error) {
	list := func(name string) ([]*knftables.Element, error) {
		typ := "map"
		if s, _ := setSpec(nftSets, name); !s.isMap {
			typ = "set"
		}
		elems, err := t.ListElements(ctx, typ, name)
		if isNotFound(err) {
			return nil, nil
		}
		return elems, err
	}
	var ks kernelState
	ex, err := list(nftExclude)
	if err != nil {
		return ks, err
	}
	for _, e := range ex {
		if len(e.Key) == 1 {
			if p := parsePrefix(e.Key[0]); p.IsValid() {
				ks.exclude = append(ks.exclude, p)
			}
		}
	}
	r := newPlanReader()
	single := func(e *knftables.Element) (netip.Addr, string, bool) {
		if len(e.Key) != 1 || len(e.Value) != 1 {
			return netip.Addr{}, "", false
		}
		pod, err := netip.ParseAddr(e.Key[0])
		return pod.Unmap(), e.Value[0], err == nil
	}
	triple := func(e *knftables.Element) (netip.Addr, annotations.DestinationPort, string, bool) {
		if len(e.Key) != 3 || len(e.Value) != 1 {
			return netip.Addr{}, annotations.DestinationPort{}, "", false
		}
		pod, err1 := netip.ParseAddr(e.Key[0])
		proto, ok := parseProto(e.Key[1])
		port, err2 := strconv.ParseUint(e.Key[2], 10, 16)
		if err1 != nil || err2 != nil || !ok || port == 0 {
			return netip.Addr{}, annotations.DestinationPort{}, "", false
		}
		return pod.Unmap(), annotations.DestinationPort{Protocol: proto, Port: uint16(port)}, e.Value[0], true
	}
	// The SNAT maps first: an "accept" of pre-ports refers to them.
	for _, name := range []string{nftSNATAll, nftSNATPorts, nftSNATChain, nftPreAll, nftPrePorts} {
		elems, err := list(name)
		if err != nil {
			return ks, err
		}
		for _, e := range elems {
			svc := comment(e)
			switch name {
			case nftSNATAll, nftSNATChain, nftPreAll:
				pod, v, ok := single(e)
				if !ok {
					continue
				}
				switch {
				case name == nftSNATAll:
					if src, err := netip.ParseAddr(v); err == nil {
						r.all(pod, action{kindSNAT, src.Unmap()}, svc)
					}
				case strings.HasPrefix(v, "goto "+nftSNATChainPrefix):
					r.chain(pod, strings.TrimPrefix(v, "goto "+nftSNATChainPrefix))
				case strings.HasPrefix(v, "goto "+nftPreChainPrefix):
					r.chain(pod, strings.TrimPrefix(v, "goto "+nftPreChainPrefix))
				default:
					if k := verdictKind(v); k != 0 {
						r.all(pod, action{kind: k}, svc)
					}
				}
			default:
				pod, port, v, ok := triple(e)
				if !ok {
					continue
				}
				if name == nftSNATPorts {
					if src, err := netip.ParseAddr(v); err == nil {
						r.port(pod, port, action{kindSNAT, src.Unmap()}, svc)
					}
					continue
				}
				switch k := verdictKind(v); {
				case k != 0:
					r.port(pod, port, action{kind: k}, svc)
				case v == "accept":
					r.accept(pod, port)
				}
			}
		}
	}
	ks.plans = r.done()
	return ks, nil
}

// verdictKind reads a prerouting verdict back.
func verdictKind(v string) kind {
	switch v {
	case "drop":
		return kindHold
	case "goto " + nftSteer, "jump " + nftSteer:
		return kindSteer
	}
	return 0
}

func comment(e *knftables.Element) string {
	if e.Comment == nil {
		return ""
	}
	return *e.Comment
}

// cleanup deletes the table of both families; a missing one is fine.
func (w *nftWriter) cleanup(ctx context.Context) error {
	var errs []error
	for _, f := range Families {
		w.fam[f].forget()
		if err := nftDeleteTable(ctx, w.tables[f]); err != nil {
			errs = append(errs, fmt.Errorf("delete table %s %s: %w", knftFamily(f), w.table, err))
		}
	}
	return errors.Join(errs...)
}

func nftDeleteTable(ctx context.Context, t NFTables) error {
	if _, err := t.List(ctx, "chains"); isNotFound(err) {
		return nil
	} else if err != nil {
		return err
	}
	tx := t.NewTransaction()
	tx.Delete(&knftables.Table{})
	return t.Run(ctx, tx)
}

// services returns the comments of the map elements and clause chain
// rules of both families.
func (w *nftWriter) services(ctx context.Context) ([]string, error) {
	var out []string
	for _, f := range Families {
		t := w.tables[f]
		for _, m := range []string{nftSNATAll, nftSNATPorts, nftPreAll, nftPrePorts} {
			elems, err := t.ListElements(ctx, "map", m)
			if isNotFound(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("%s: list map %s: %w", f, m, err)
			}
			for _, e := range elems {
				if c := comment(e); c != "" && !strings.HasPrefix(c, "egressvip:") {
					out = append(out, c)
				}
			}
		}
		chains, err := t.List(ctx, "chains")
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: list chains: %w", f, err)
		}
		for _, ch := range chains {
			if !strings.HasPrefix(ch, nftPreChainPrefix) && !strings.HasPrefix(ch, nftSNATChainPrefix) {
				continue
			}
			rules, err := t.ListRules(ctx, ch)
			if err != nil {
				return nil, fmt.Errorf("%s: list chain %s: %w", f, ch, err)
			}
			for _, r := range rules {
				if r.Comment != nil && !strings.HasPrefix(*r.Comment, "egressvip:") {
					out = append(out, *r.Comment)
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// planReader rebuilds podPlans from what a backend holds: the SNAT
// entries first, then the prerouting ones; the first entry for a pod's
// traffic wins, as it did when they were written.
type planReader struct {
	plans   map[netip.Addr]*podPlan
	accepts map[netip.Addr][]annotations.DestinationPort
}

func newPlanReader() *planReader {
	return &planReader{plans: map[netip.Addr]*podPlan{}, accepts: map[netip.Addr][]annotations.DestinationPort{}}
}

func (r *planReader) pod(a netip.Addr) *podPlan {
	p := r.plans[a]
	if p == nil {
		p = &podPlan{}
		r.plans[a] = p
	}
	return p
}

func (r *planReader) all(pod netip.Addr, a action, svc string) {
	if p := r.pod(pod); p.all.kind == 0 {
		p.all = entry{a, svc}
	}
}

func (r *planReader) port(pod netip.Addr, port annotations.DestinationPort, a action, svc string) {
	p := r.pod(pod)
	if _, ok := p.ports[port]; ok {
		return
	}
	if p.ports == nil {
		p.ports = map[annotations.DestinationPort]entry{}
	}
	p.ports[port] = entry{a, svc}
}

// accept records that prerouting leaves the pod's traffic to port alone:
// its SNAT entry, or none.
func (r *planReader) accept(pod netip.Addr, port annotations.DestinationPort) {
	r.accepts[pod] = append(r.accepts[pod], port)
}

func (r *planReader) chain(pod netip.Addr, digest string) { r.pod(pod).digest = digest }

func (r *planReader) done() map[netip.Addr]*podPlan {
	for pod, ports := range r.accepts {
		for _, port := range ports {
			r.port(pod, port, action{}, "")
		}
	}
	for _, p := range r.plans {
		if p.digest != "" {
			p.all, p.ports = entry{}, nil
		}
		p.canonical()
	}
	return r.plans
}
