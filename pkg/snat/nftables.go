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
	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"
)

// What egressvip owns in nftables: one table named TableName in each of the
// ip and ip6 families, nothing else. Per family:
//
//	table ip egressvip {
//		comment "egressvip: egress SNAT"
//		set exclude { type ipv4_addr; flags interval; }              # pod and Service CIDRs
//		map snat-ports { type ipv4_addr . inet_proto . inet_service : ipv4_addr; }
//		map snat-all { type ipv4_addr : ipv4_addr; }
//		chain postrouting {
//			type nat hook postrouting priority 90; policy accept;   # srcnat - 10
//			ip daddr @exclude return
//			snat to ip saddr . meta l4proto . th dport map @snat-ports
//			snat to ip saddr map @snat-all
//		}
//	}
//
// Every map element carries its Service ("namespace/name") as comment. A new
// connection costs one set lookup and at most two map lookups, whatever the
// number of Services. The chain's priority (NFTPriority, 90) runs it before
// iptables' nat POSTROUTING and kube-proxy's nftables nat-postrouting chain
// (both srcnat, 100): the kernel stops at the first nat chain that sets up a
// source translation, so no rule that iptables, kube-proxy or a CNI adds at
// srcnat priority, at any position, can come first. Excluded destinations
// and pods without an element fall through to them.
const (
	// TableName is egressvip's table in the ip and the ip6 family.
	TableName = "egressvip"
	// NFTPriority is the priority of the postrouting base chain: srcnat - 10,
	// which knftables writes as 90.
	NFTPriority = knftables.SNATPriority + "-10"
	// TableComment is the comment of the table.
	TableComment = "egressvip: egress SNAT"

	nftChain     = "postrouting"
	nftExclude   = "exclude"
	nftSNATPorts = "snat-ports"
	nftSNATAll   = "snat-all"
)

// NFTables is the kernel side of one family's egressvip table: knftables for
// transactions and reads, plus the two reads the cheap check needs. The real
// one runs the nft binary in the network namespace of the calling thread;
// FakeNFT keeps a knftables.Fake.
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
}

func newRealNFT(f Family) (*realNFT, error) {
	nft, err := knftables.New(knftFamily(f), TableName)
	if err != nil {
		return nil, err
	}
	return &realNFT{Interface: nft, family: knftFamily(f)}, nil
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
	return nftFingerprint(fam, TableName)
}

func (n *realNFT) Generation() (uint32, error) { return nftGeneration() }

// nftElem is one map element: key components, value and comment.
type nftElem struct {
	key     []string
	value   string
	comment string
}

// nftContent is what the table of one family holds, as written.
type nftContent struct {
	exclude []string
	all     map[string]nftElem // by joined key
	ports   map[string]nftElem
}

func (c *nftContent) equal(o *nftContent) bool {
	eq := func(a, b nftElem) bool {
		return a.value == b.value && a.comment == b.comment && slices.Equal(a.key, b.key)
	}
	return slices.Equal(c.exclude, o.exclude) && maps.EqualFunc(c.all, o.all, eq) && maps.EqualFunc(c.ports, o.ports, eq)
}

// nftRender computes the table content of a Desired already normalised by
// forFamily, with the semantics of the iptables chain (see translations):
// per pod, in rule order, an all-traffic rule shadows every later rule of
// the pod, and the first rule that names a (protocol, port) wins it. The
// port map is looked up first, so its elements win over the pod's
// all-traffic element, as the earlier port rules win in the iptables chain.
func nftRender(d Desired) *nftContent {
	c := &nftContent{exclude: minimalPrefixes(d.Exclude), all: map[string]nftElem{}, ports: map[string]nftElem{}}
	shadowed := map[netip.Addr]bool{}
	for _, r := range d.Rules {
		if shadowed[r.PodIP] {
			continue
		}
		pod, src := r.PodIP.String(), r.SourceIP.String()
		if len(r.Ports) == 0 {
			shadowed[r.PodIP] = true
			c.all[pod] = nftElem{key: []string{pod}, value: src, comment: r.Service}
			continue
		}
		for _, p := range r.Ports {
			key := []string{pod, strconv.Itoa(int(protoNumbers[p.Protocol])), strconv.Itoa(int(p.Port))}
			k := strings.Join(key, " . ")
			if _, ok := c.ports[k]; !ok {
				c.ports[k] = nftElem{key: key, value: src, comment: r.Service}
			}
		}
	}
	return c
}

// minimalPrefixes drops every prefix inside another one (an interval set
// refuses overlapping elements) and returns the rest as strings, sorted.
// ps is sorted by comparePrefix, so a prefix can only lie inside the last
// one kept.
func minimalPrefixes(ps []netip.Prefix) []string {
	var kept []netip.Prefix
	for _, p := range ps {
		if n := len(kept); n > 0 && kept[n-1].Bits() <= p.Bits() && kept[n-1].Contains(p.Addr()) {
			continue
		}
		kept = append(kept, p)
	}
	out := make([]string, len(kept))
	for i, p := range kept {
		out[i] = p.String()
	}
	return out
}

// nftSchema returns the objects of one family's table, without elements.
func nftSchema(f Family) ([]knftables.Object, []*knftables.Rule) {
	ip, addr := "ip", "ipv4_addr"
	if f == IPv6 {
		ip, addr = "ip6", "ipv6_addr"
	}
	objs := []knftables.Object{
		&knftables.Chain{
			Name:     nftChain,
			Type:     knftables.PtrTo(knftables.NATType),
			Hook:     knftables.PtrTo(knftables.PostroutingHook),
			Priority: knftables.PtrTo(knftables.BaseChainPriority(NFTPriority)),
		},
		&knftables.Set{
			Name:    nftExclude,
			Type:    addr,
			Flags:   []knftables.SetFlag{knftables.IntervalFlag},
			Comment: knftables.PtrTo("pod and Service CIDRs: never SNATed by egressvip"),
		},
		&knftables.Map{
			Name:    nftSNATPorts,
			Type:    addr + " . inet_proto . inet_service : " + addr,
			Comment: knftables.PtrTo("pod . protocol . destination port : LoadBalancer IP"),
		},
		&knftables.Map{
			Name:    nftSNATAll,
			Type:    addr + " : " + addr,
			Comment: knftables.PtrTo("pod : LoadBalancer IP"),
		},
	}
	rules := []*knftables.Rule{
		{Chain: nftChain, Rule: ip + " daddr @" + nftExclude + " return", Comment: knftables.PtrTo(ExcludeComment)},
		{Chain: nftChain, Rule: "snat to " + ip + " saddr . meta l4proto . th dport map @" + nftSNATPorts, Comment: knftables.PtrTo("egressvip: SNAT by pod and destination")},
		{Chain: nftChain, Rule: "snat to " + ip + " saddr map @" + nftSNATAll, Comment: knftables.PtrTo("egressvip: SNAT by pod")},
	}
	return objs, rules
}

// nftWriter is the nftables backend.
type nftWriter struct {
	tables [2]NFTables
	fam    [2]nftState
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

func newNFTWriter(tables [2]NFTables) (*nftWriter, error) {
	w := &nftWriter{tables: tables}
	for _, f := range Families {
		if w.tables[f] != nil {
			continue
		}
		t, err := newRealNFT(f)
		if err != nil {
			return nil, fmt.Errorf("SNAT backend nftables needs a working nft binary (%w); the env var %s selects the backend (%s)",
				err, backendEnv, strings.Join(Backends, ", "))
		}
		w.tables[f] = t
	}
	return w, nil
}

// write makes the table of family f hold next in one transaction: only the
// changed elements when the table still verifiably holds what the last
// write left (same generation, or same fingerprint), else the whole table
// replaced (deleted and re-created, atomically).
func (w *nftWriter) write(ctx context.Context, f Family, next Desired) error {
	t, st := w.tables[f], &w.fam[f]
	want := nftRender(next)
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
		nftDiff(tx, st.content, want)
		err = w.run(ctx, f, tx, g0, gerr)
	}
	if st.content == nil || err != nil {
		// Unknown state, or the diff did not apply: replace the table.
		g0, gerr = t.Generation()
		tx := t.NewTransaction()
		nftReplace(tx, f, want)
		err = w.run(ctx, f, tx, g0, gerr)
	}
	if err != nil {
		st.forget()
		return fmt.Errorf("write table %s %s: %w", knftFamily(f), TableName, err)
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

// nftReplace adds to tx the whole table: deleted if it exists, then
// created with its chain, set, maps, rules and elements.
func nftReplace(tx *knftables.Transaction, f Family, c *nftContent) {
	tx.Add(&knftables.Table{Comment: knftables.PtrTo(TableComment)})
	tx.Delete(&knftables.Table{})
	tx.Add(&knftables.Table{Comment: knftables.PtrTo(TableComment)})
	objs, rules := nftSchema(f)
	for _, o := range objs {
		tx.Add(o)
	}
	for _, r := range rules {
		tx.Add(r)
	}
	for _, p := range c.exclude {
		tx.Add(&knftables.Element{Set: nftExclude, Key: []string{p}})
	}
	for _, name := range []string{nftSNATPorts, nftSNATAll} {
		m := c.ports
		if name == nftSNATAll {
			m = c.all
		}
		for _, k := range slices.Sorted(maps.Keys(m)) {
			e := m[k]
			tx.Add(&knftables.Element{Map: name, Key: e.key, Value: []string{e.value}, Comment: knftables.PtrTo(e.comment)})
		}
	}
}

// nftDiff adds to tx what turns the table from old into c: changed
// exclusions rewrite the (small) set; map elements that went or changed
// are deleted, new and changed ones added.
func nftDiff(tx *knftables.Transaction, old, c *nftContent) {
	if !slices.Equal(old.exclude, c.exclude) {
		tx.Flush(&knftables.Set{Name: nftExclude})
		for _, p := range c.exclude {
			tx.Add(&knftables.Element{Set: nftExclude, Key: []string{p}})
		}
	}
	for _, name := range []string{nftSNATPorts, nftSNATAll} {
		before, after := old.ports, c.ports
		if name == nftSNATAll {
			before, after = old.all, c.all
		}
		// Only the changes are sorted (for a readable, stable transaction).
		var gone, added []string
		for k, b := range before {
			if e, ok := after[k]; !ok || e.value != b.value || e.comment != b.comment {
				gone = append(gone, k)
			}
		}
		for k, e := range after {
			if b, ok := before[k]; !ok || e.value != b.value || e.comment != b.comment {
				added = append(added, k)
			}
		}
		slices.Sort(gone)
		slices.Sort(added)
		for _, k := range gone {
			tx.Delete(&knftables.Element{Map: name, Key: before[k].key})
		}
		for _, k := range added {
			e := after[k]
			tx.Add(&knftables.Element{Map: name, Key: e.key, Value: []string{e.value}, Comment: knftables.PtrTo(e.comment)})
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
			return false, nil
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
// the Desired state they implement, and the next write replaces the table.
func (w *nftWriter) seed(ctx context.Context, f Family) (Desired, bool, error) {
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
			return Desired{}, true, nil
		}
	}
	st.forget()
	d, err := nftRead(ctx, t, f)
	return d, false, err
}

// nftRead reads the elements of family f's table back into a Desired state:
// one Rule per all-traffic element and per (Service, pod, source) of the
// port elements. A missing table reads as empty.
func nftRead(ctx context.Context, t NFTables, f Family) (Desired, error) {
	var d Desired
	ex, err := t.ListElements(ctx, "set", nftExclude)
	if isNotFound(err) {
		return Desired{}, nil
	}
	if err != nil {
		return Desired{}, err
	}
	for _, e := range ex {
		if len(e.Key) == 1 {
			if p := parsePrefix(e.Key[0]); p.IsValid() {
				d.Exclude = append(d.Exclude, p)
			}
		}
	}
	all, err := t.ListElements(ctx, "map", nftSNATAll)
	if err != nil && !isNotFound(err) {
		return Desired{}, err
	}
	for _, e := range all {
		if len(e.Key) != 1 || len(e.Value) != 1 {
			continue
		}
		pod, err1 := netip.ParseAddr(e.Key[0])
		src, err2 := netip.ParseAddr(e.Value[0])
		if err1 == nil && err2 == nil {
			d.Rules = append(d.Rules, Rule{Service: comment(e), PodIP: pod, SourceIP: src})
		}
	}
	ports, err := t.ListElements(ctx, "map", nftSNATPorts)
	if err != nil && !isNotFound(err) {
		return Desired{}, err
	}
	type key struct {
		service  string
		pod, src netip.Addr
	}
	idx := map[key]int{}
	for _, e := range ports {
		if len(e.Key) != 3 || len(e.Value) != 1 {
			continue
		}
		pod, err1 := netip.ParseAddr(e.Key[0])
		src, err2 := netip.ParseAddr(e.Value[0])
		proto, ok := parseProto(e.Key[1])
		port, err3 := strconv.ParseUint(e.Key[2], 10, 16)
		if err1 != nil || err2 != nil || err3 != nil || !ok || port == 0 {
			continue
		}
		k := key{comment(e), pod, src}
		i, seen := idx[k]
		if !seen {
			i = len(d.Rules)
			idx[k] = i
			d.Rules = append(d.Rules, Rule{Service: k.service, PodIP: pod, SourceIP: src})
		}
		d.Rules[i].Ports = append(d.Rules[i].Ports, annotations.DestinationPort{Protocol: proto, Port: uint16(port)})
	}
	return d.forFamily(f), nil
}

func comment(e *knftables.Element) string {
	if e.Comment == nil {
		return ""
	}
	return *e.Comment
}

// parseProto reads an inet_proto value as nft prints it (a name) or as
// egressvip writes it (a number).
func parseProto(s string) (annotations.Protocol, bool) {
	for p, n := range protoNumbers {
		if s == string(p) || s == strconv.Itoa(int(n)) {
			return p, true
		}
	}
	return "", false
}

// cleanup deletes the table of both families; a missing one is fine.
func (w *nftWriter) cleanup(ctx context.Context) error {
	var errs []error
	for _, f := range Families {
		w.fam[f].forget()
		if err := nftDeleteTable(ctx, w.tables[f]); err != nil {
			errs = append(errs, fmt.Errorf("delete table %s %s: %w", knftFamily(f), TableName, err))
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

// services returns the comments of the map elements of both families.
func (w *nftWriter) services(ctx context.Context) ([]string, error) {
	var out []string
	for _, f := range Families {
		for _, m := range []string{nftSNATAll, nftSNATPorts} {
			elems, err := w.tables[f].ListElements(ctx, "map", m)
			if isNotFound(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("snat %s: list map %s: %w", f, m, err)
			}
			for _, e := range elems {
				if c := comment(e); c != "" {
					out = append(out, c)
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}
