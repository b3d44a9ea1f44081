package node

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/netif"
)

// journal is one ordered record of what the fakes did to the kernel and to
// the Leases ("bind 203.0.113.10", "release egressvip/egressvip-web"), so a
// test can assert that an address went before its Lease.
type journal struct {
	mu  sync.Mutex
	ops []string
}

func (j *journal) add(format string, args ...any) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.ops = append(j.ops, fmt.Sprintf(format, args...))
}

// index is the position of the first op, -1 if it never happened.
func (j *journal) index(op string) int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Index(j.ops, op)
}

func (j *journal) has(op string) bool { return j.index(op) >= 0 }

func (j *journal) String() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return fmt.Sprint(j.ops)
}

// fakeAddrs is a stateful serviceInterface (pkg/netif): the owned addresses
// bound on it, addresses the kernel refuses to add or remove, an interface
// that is missing or down, other hosts that answer probes.
type fakeAddrs struct {
	j *journal

	mu      sync.Mutex
	bound   map[netip.Addr]bool
	failAdd map[netip.Addr]error
	failDel map[netip.Addr]error
	// missing: the interface does not exist (its addresses went with
	// it); down: it exists but cannot carry traffic.
	missing, down bool
	// answers are other hosts answering probes for an address.
	answers   map[netip.Addr]net.HardwareAddr
	probes    [][]netip.Addr
	onProbe   func() // called by Probe, without the lock
	persisted []netip.Addr
	refreshes int
	host      netif.Host
}

func newFakeAddrs(j *journal) *fakeAddrs {
	return &fakeAddrs{j: j, bound: map[netip.Addr]bool{}, failAdd: map[netip.Addr]error{}, failDel: map[netip.Addr]error{},
		answers: map[netip.Addr]net.HardwareAddr{},
		host: netif.Host{Own: []netip.Addr{addr("203.0.113.2")}, Subnets: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")},
			Gateways: []netip.Addr{addr("203.0.113.1")}}}
}

func errMissing() error {
	return fmt.Errorf("interface %q not found: %w", "eth1", netif.ErrInterfaceNotFound)
}

func (f *fakeAddrs) Sync(_ context.Context, want []model.Binding) (netif.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var res netif.Result
	if f.missing {
		return res, errMissing()
	}
	fail := func(a netip.Addr, err error) {
		if res.Failed == nil {
			res.Failed = map[netip.Addr]error{}
		}
		res.Failed[a] = err
	}
	wanted := map[netip.Addr]model.Binding{}
	for _, b := range want {
		wanted[b.Addr] = b
	}
	for _, a := range slices.SortedFunc(maps.Keys(f.bound), netip.Addr.Compare) {
		if _, ok := wanted[a]; ok {
			continue
		}
		if err := f.failDel[a]; err != nil {
			fail(a, err)
			continue
		}
		delete(f.bound, a)
		res.Removed = append(res.Removed, a)
		f.j.add("remove %s", a)
	}
	for _, b := range want {
		switch {
		case f.bound[b.Addr]:
		case b.KeepOnly || f.down:
			res.Absent = append(res.Absent, b.Addr)
		case f.failAdd[b.Addr] != nil:
			fail(b.Addr, f.failAdd[b.Addr])
		default:
			f.bound[b.Addr] = true
			res.Added = append(res.Added, b.Addr)
			f.j.add("bind %s", b.Addr)
		}
	}
	if f.down {
		return res, fmt.Errorf("interface %q is not up: %w", "eth1", netif.ErrInterfaceDown)
	}
	return res, nil
}

func (f *fakeAddrs) Refresh(context.Context, func() bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refreshes++
	if f.missing {
		return errMissing()
	}
	return nil
}

func (f *fakeAddrs) Owned() ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.missing {
		return nil, errMissing()
	}
	return slices.SortedFunc(maps.Keys(f.bound), netip.Addr.Compare), nil
}

func (f *fakeAddrs) Host() (netif.Host, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.missing {
		return netif.Host{}, errMissing()
	}
	h := f.host
	h.Up = !f.down
	return h, nil
}

func (f *fakeAddrs) Probe(_ context.Context, addrs []netip.Addr, _ time.Duration) (map[netip.Addr]net.HardwareAddr, error) {
	if f.onProbe != nil {
		f.onProbe()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.missing {
		return nil, errMissing()
	}
	f.probes = append(f.probes, slices.Clone(addrs))
	out := map[netip.Addr]net.HardwareAddr{}
	for _, a := range addrs {
		f.j.add("probe %s", a)
		if mac, ok := f.answers[a]; ok {
			out[a] = mac
		}
	}
	return out, nil
}

func (f *fakeAddrs) Persist(_ context.Context, addrs []netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range addrs {
		f.persisted = append(f.persisted, a)
		f.j.add("persist %s", a)
	}
	return nil
}

func (f *fakeAddrs) has(ip string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bound[addr(ip)]
}

// set changes the fake under its lock.
func (f *fakeAddrs) set(change func(f *fakeAddrs)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	change(f)
}

func (f *fakeAddrs) probeCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.probes)
}

func (f *fakeAddrs) refreshCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refreshes
}

// fakeSNAT is a stateful firewall writer (pkg/snat): it keeps the last
// datapath written, can fail Services or everything, and has a Checker
// whose answer tests tamper with; an Apply after Recheck rewrites (and so
// repairs) the rules.
type fakeSNAT struct {
	mu       sync.Mutex
	last     model.Datapath
	applies  int
	rechecks int
	rewrites int
	recheck  bool
	tampered bool
	// unverified makes Check answer model.ErrUnverified until a rewrite.
	unverified bool
	fail       map[string]error
	err        error
}

func (f *fakeSNAT) Apply(_ context.Context, d model.Datapath) (map[string]error, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.last = d
	f.applies++
	if f.recheck || f.unverified {
		// Like pkg/snat: a rewrite after Recheck, or of rules it could
		// not verify.
		f.recheck = false
		f.rewrites++
		f.tampered, f.unverified = false, false
	}
	return maps.Clone(f.fail), f.err
}

func (f *fakeSNAT) Recheck() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rechecks++
	f.recheck = true
}

func (f *fakeSNAT) Check(context.Context) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unverified {
		return false, model.ErrUnverified
	}
	return !f.tampered, nil
}

func (f *fakeSNAT) datapath() model.Datapath {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last
}

func (f *fakeSNAT) set(change func(f *fakeSNAT)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	change(f)
}

// snat lists the SNAT rules of service as "pod>source".
func (f *fakeSNAT) snat(service string) []string {
	var out []string
	for _, r := range f.datapath().SNAT {
		if r.Service == service {
			out = append(out, r.Pod.String()+">"+r.Source.String())
		}
	}
	slices.Sort(out)
	return out
}

// fakeRoutes keeps the last routes written (pkg/steer).
type fakeRoutes struct {
	mu   sync.Mutex
	last model.Routes
}

func (f *fakeRoutes) Apply(_ context.Context, r model.Routes) (map[string]error, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.last = r
	return nil, nil
}

func (f *fakeRoutes) routes() model.Routes {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last
}

// fakeElections holds the election view tests set (peers, Leases,
// heartbeat state); it records the writes the controller asks for and,
// when granting, performs acquisitions as the real election does once its
// write returned: the Lease names this node, current and valid, and the
// loop is poked.
type fakeElections struct {
	j     *journal
	clock clock.PassiveClock

	mu          sync.Mutex
	view        model.ElectionView
	grant       bool
	poke        func()
	claims      []model.Claim
	released    []types.NamespacedName
	deleted     []types.NamespacedName
	releasedNow []types.NamespacedName
	drained     bool
	peerAddrs   map[netip.Addr]bool
	lapses      uint64
}

func newFakeElections(j *journal, c clock.PassiveClock) *fakeElections {
	return &fakeElections{j: j, clock: c, view: model.ElectionView{Self: nodeName, Established: true,
		Peers: map[string]model.Peer{}, Leases: map[types.NamespacedName]model.Lease{}},
		peerAddrs: map[netip.Addr]bool{}}
}

// View is the view tests set. Like the real election, this node's own
// holdings are valid only while its heartbeat is established and not
// overdue, another node's while its heartbeat is live.
func (f *fakeElections) View() model.ElectionView {
	f.mu.Lock()
	defer f.mu.Unlock()
	v := f.view
	v.Now = f.clock.Now()
	v.Peers = maps.Clone(f.view.Peers)
	v.Leases = make(map[types.NamespacedName]model.Lease, len(f.view.Leases))
	for k, l := range f.view.Leases {
		switch {
		case l.Holder == "":
			l.Valid = false
		case l.Holder == v.Self:
			l.Valid = v.Established && !v.Overdue
		default:
			l.Valid = v.Peers[l.Holder].Live
		}
		v.Leases[k] = l
	}
	return v
}

func (f *fakeElections) Fresh() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.view.Established && !f.view.Overdue
}

// Epoch is 1 once established, plus the lapses tests add (lapse).
func (f *fakeElections) Epoch() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.view.Established {
		return 0
	}
	return 1 + f.lapses
}

// lapse is a heartbeat that came back after a lease duration: a new epoch.
func (f *fakeElections) lapse() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lapses++
}

func (f *fakeElections) Acquire(c model.Claim) {
	f.mu.Lock()
	f.claims = append(f.claims, c)
	f.j.add("acquire %s", c.Lease)
	grant := f.grant
	if grant {
		f.holdLocked(c)
	}
	f.mu.Unlock()
	if grant {
		f.changed()
	}
}

// holdLocked writes the claim's Lease as held by this node in this epoch.
func (f *fakeElections) holdLocked(c model.Claim) {
	l := model.Lease{Kind: c.Kind, Holder: f.view.Self, Writer: model.Current, Current: true, ClaimedBy: c.ClaimedBy}
	for _, o := range c.Owners {
		l.Owners = append(l.Owners, o.UID)
	}
	f.view.Leases[c.Lease] = l
}

// grantAll performs every acquisition asked for so far, and from now on
// each one as it is asked for.
func (f *fakeElections) grantAll() {
	f.mu.Lock()
	f.grant = true
	for _, c := range f.claims {
		f.holdLocked(c)
	}
	f.mu.Unlock()
	f.changed()
}

func (f *fakeElections) releaseLocked(l types.NamespacedName) {
	lv := f.view.Leases[l]
	f.view.Leases[l] = model.Lease{Kind: lv.Kind, Owners: lv.Owners, ClaimedBy: lv.ClaimedBy}
	f.j.add("release %s", l)
}

// changed pokes the loop, as the real election does when its watch sees a
// Lease change; f.mu must not be held.
func (f *fakeElections) changed() {
	f.mu.Lock()
	poke := f.poke
	f.mu.Unlock()
	if poke != nil {
		poke()
	}
}

func (f *fakeElections) Release(l types.NamespacedName) {
	f.mu.Lock()
	f.released = append(f.released, l)
	f.releaseLocked(l)
	f.mu.Unlock()
	f.changed()
}

func (f *fakeElections) Delete(l types.NamespacedName) {
	f.mu.Lock()
	f.deleted = append(f.deleted, l)
	delete(f.view.Leases, l)
	f.j.add("delete %s", l)
	f.mu.Unlock()
	f.changed()
}

func (f *fakeElections) Drain(context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.drained = true
	f.view.Draining = true
	f.j.add("drain")
}

func (f *fakeElections) ReleaseNow(_ context.Context, leases []types.NamespacedName) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range leases {
		f.releasedNow = append(f.releasedNow, l)
		f.releaseLocked(l)
	}
}

func (f *fakeElections) PeerAddresses() map[netip.Addr]bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.peerAddrs)
}

// set changes the view, and pokes the loop as the real election would.
func (f *fakeElections) set(change func(v *model.ElectionView)) {
	f.mu.Lock()
	change(&f.view)
	f.mu.Unlock()
	f.changed()
}

// peer makes node a live, current candidate with next hops via.
func (f *fakeElections) peer(node string, via ...string) {
	p := model.Peer{Version: election.ProtocolVersion, Live: true, Candidate: true}
	for _, a := range via {
		p.Via = append(p.Via, addr(a))
	}
	f.set(func(v *model.ElectionView) { v.Peers[node] = p })
}

// hold makes node the holder of the Leases of the named Services of
// namespace default and of addrs (current when node is this one).
func (f *fakeElections) hold(node string, services []string, addrs ...string) {
	f.set(func(v *model.ElectionView) {
		for _, s := range services {
			v.Leases[svcLease(s)] = model.Lease{Kind: model.ServiceLease, Holder: node, Writer: model.Current,
				Current: node == v.Self, Owners: []types.UID{uid(s)}}
		}
		for _, a := range addrs {
			v.Leases[addrLease(a)] = model.Lease{Kind: model.AddressLease, Holder: node, Writer: model.Current,
				Current: node == v.Self, ClaimedBy: "default"}
		}
	})
}

func (f *fakeElections) lease(key types.NamespacedName) model.Lease {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.view.Leases[key]
}

// claimed lists the Leases acquisitions were asked for, in order.
func (f *fakeElections) claimed() []types.NamespacedName {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]types.NamespacedName, 0, len(f.claims))
	for _, c := range f.claims {
		out = append(out, c.Lease)
	}
	return out
}

func (f *fakeElections) claimsOf() []model.Claim {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.claims)
}

func (f *fakeElections) wasReleased(key types.NamespacedName) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.released, key) || slices.Contains(f.releasedNow, key)
}

// fakeCluster is the CIDR detector (pkg/cidr): fixed ranges and Nodes.
type fakeCluster struct {
	nodes map[string]*corev1.Node
}

func newFakeCluster() *fakeCluster {
	node := func(name, ip, podCIDR string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name)},
			Spec:   corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}}}
	}
	return &fakeCluster{nodes: map[string]*corev1.Node{
		nodeName: node(nodeName, "192.0.2.1", "10.244.1.0/24"),
		"node-b": node("node-b", "192.0.2.2", "10.244.2.0/24"),
	}}
}

func (c *fakeCluster) Exclude() []netip.Prefix {
	return []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12")}
}

func (c *fakeCluster) PodCIDRs() []netip.Prefix {
	return []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}
}

func (c *fakeCluster) NodeAddresses() map[netip.Addr]bool {
	return map[netip.Addr]bool{addr("192.0.2.1"): true, addr("192.0.2.2"): true}
}

func (c *fakeCluster) Missing(v6 bool) []string {
	if v6 {
		return []string{"pod", "Service"}
	}
	return nil
}

func (c *fakeCluster) Node(name string) (*corev1.Node, bool) {
	n, ok := c.nodes[name]
	return n, ok
}
