package explain

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/cidr"
	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/plan"
)

// Objects are what explain reads from the API server (Fetch). Overlapping
// lists are fine: objects are told apart by namespace and name.
type Objects struct {
	// Services are every Service egressvip might serve (all namespaces,
	// or svc_namespace's): those sharing an address with the target are
	// elected with it, and one of another namespace may have claimed it
	// first.
	Services []*corev1.Service
	// EndpointSlices are the slices of those Services.
	EndpointSlices []*discoveryv1.EndpointSlice
	// Pods are the pods of the target's namespace and every pod of the
	// nodes its endpoints run on: each node's daemon trusts an endpoint
	// only if it is one of that node's pods.
	Pods []*corev1.Pod
	// Nodes, ServiceCIDRs and KCMPods are the CIDR detection's inputs
	// (pkg/cidr); Nodes also give the Node addresses no Service may claim.
	Nodes        []*corev1.Node
	ServiceCIDRs []*networkingv1.ServiceCIDR
	KCMPods      []*corev1.Pod
	// Leases are the heartbeats, address Leases and global Lease of the
	// daemon's namespace and the Service Leases of the Services.
	Leases []*coordinationv1.Lease
}

// Config is the daemon's configuration that the answer depends on (the
// same environment as `egressvip run`).
type Config struct {
	DaemonNamespace string
	// Namespace is svc_namespace ("" for all).
	Namespace string
	// Owns says whether a Service of that loadBalancerClass is ours (nil:
	// a Service without class only).
	Owns func(class *string) bool
	// Global is the one Lease of svc_election=false (nil: per address).
	Global *types.NamespacedName
	Timing election.Timing
	// Allowed is egressvip_allowed_cidrs.
	Allowed []netip.Prefix
	// Override is egress_podcidr and egress_servicecidr.
	Override cidr.Override
	// Tunnel is set in VXLAN mode.
	Tunnel *model.Tunnel
}

// Local is what the observer's kernel holds (pkg/explain/kernel reads it).
type Local struct {
	// Node is the node explain runs on (vip_nodename).
	Node string
	// Interface is the serviceInterface; Host what the node itself uses
	// there (nil when it could not be read: HostError).
	Interface string
	Host      *model.Host
	HostError string
	// Owned are the addresses egressvip bound on the serviceInterface.
	Owned      []netip.Addr
	OwnedError string
	// Backend is the firewall backend; FirewallServices the Services
	// ("namespace/name") it has rules for.
	Backend          string
	FirewallServices []string
	FirewallError    string
	// Rules are the ip rules with egressvip's protocol.
	Rules      []LocalRule
	RulesError string
}

// LocalRule is one ip rule with egressvip's protocol, with the routes of
// the table it looks up.
type LocalRule struct {
	Priority int
	Src      netip.Prefix
	Mark     uint32
	Mask     uint32
	Table    int
	Routes   []string
}

// bystander is the Self of the view every node shares: no node has this
// name (a node name has no parentheses), so every node is a peer and the
// bystander itself never stands.
const bystander = "(cluster)"

// transientSettle is how long the daemon lets a transient problem last
// before it raises it (pkg/node).
const transientSettle = 5 * time.Second

// Build explains one Service at now from the objects read from the API
// server and, on a node, what its kernel holds (local may be nil).
func Build(target types.NamespacedName, now time.Time, objs Objects, cfg Config, local *Local) Report {
	b := newBuilder(target, now, objs, cfg, local)
	return b.report()
}

// builder carries one Build.
type builder struct {
	target types.NamespacedName
	now    time.Time
	objs   Objects
	cfg    Config
	local  *Local

	detect  cidr.Result
	beats   map[string]election.Heartbeat
	leases  map[types.NamespacedName]*coordinationv1.Lease
	pods    map[types.NamespacedName]*corev1.Pod
	podsOn  map[string][]*corev1.Pod
	nodeObj map[string]bool
	svc     *corev1.Service
	related []*corev1.Service
	slices  map[types.NamespacedName][]*discoveryv1.EndpointSlice
	// runs are the per-node planner runs, by node; obs the bystander's.
	runs map[string]*run
	obs  *run
}

// run is one node's analysis and plan of the Service's group.
type run struct {
	node string
	view model.ElectionView
	host model.Host
	// before is the target as analysed, svc as admitted.
	before, svc model.Service
	plan        plan.Plan
	// group is the target's group (nil when the Service is not valid).
	group *plan.GroupView
}

func newBuilder(target types.NamespacedName, now time.Time, objs Objects, cfg Config, local *Local) *builder {
	b := &builder{target: target, now: now, objs: objs, cfg: cfg, local: local,
		leases: map[types.NamespacedName]*coordinationv1.Lease{}, pods: map[types.NamespacedName]*corev1.Pod{},
		podsOn: map[string][]*corev1.Pod{}, nodeObj: map[string]bool{}, beats: map[string]election.Heartbeat{},
		slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{}, runs: map[string]*run{}}
	if b.cfg.Owns == nil {
		b.cfg.Owns = func(class *string) bool { return class == nil || *class == "" }
	}
	b.detect = cidr.Detect(cidr.Inputs{Override: cfg.Override, ServiceCIDRs: objs.ServiceCIDRs, Nodes: objs.Nodes, KCMPods: objs.KCMPods})
	for _, n := range objs.Nodes {
		b.nodeObj[n.Name] = true
	}
	for _, l := range objs.Leases {
		b.leases[types.NamespacedName{Namespace: l.Namespace, Name: l.Name}] = l
	}
	for _, h := range election.OfflineHeartbeats(b.offline("")) {
		b.beats[h.Node] = h
	}
	for _, p := range objs.Pods {
		key := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		if _, dup := b.pods[key]; dup {
			continue
		}
		b.pods[key] = p
		if p.Spec.NodeName != "" {
			b.podsOn[p.Spec.NodeName] = append(b.podsOn[p.Spec.NodeName], p)
		}
	}
	for _, sl := range objs.EndpointSlices {
		name := sl.Labels[discoveryv1.LabelServiceName]
		if name == "" {
			continue
		}
		key := types.NamespacedName{Namespace: sl.Namespace, Name: name}
		b.slices[key] = append(b.slices[key], sl)
	}
	for key := range b.slices {
		slices.SortFunc(b.slices[key], func(x, y *discoveryv1.EndpointSlice) int { return strings.Compare(x.Name, y.Name) })
	}
	for _, s := range objs.Services {
		if s.Namespace == target.Namespace && s.Name == target.Name {
			b.svc = s
		}
	}
	return b
}

func (b *builder) offline(self string) election.Offline {
	return election.Offline{Self: self, Now: b.now, Timing: b.cfg.Timing, Leases: b.objs.Leases,
		NodeExists: func(name string) (bool, bool) { return b.nodeObj[name], len(b.objs.Nodes) > 0 }}
}

func (b *builder) report() Report {
	r := Report{Time: b.now, Settings: b.settings(),
		Service: Service{Namespace: b.target.Namespace, Name: b.target.Name, Problems: []Problem{}, Addresses: []Address{},
			ReadyNodes: []string{}, Eligible: []string{}},
		Leases: []Lease{}, Nodes: []Node{}, Endpoints: []Endpoint{}}
	if b.local != nil {
		r.Observer = b.local.Node
	}
	if b.svc == nil {
		return r
	}
	r.Service.Found = true
	r.Service.TrafficPolicy = string(corev1.ServiceExternalTrafficPolicyCluster)
	if b.svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
		r.Service.TrafficPolicy = string(corev1.ServiceExternalTrafficPolicyLocal)
	}
	r.Service.Status = status(b.svc)
	if why := b.ignored(b.svc); why != "" {
		r.Service.Ignored = why
		v4, v6, _ := annotations.ServiceLoadBalancerIPs(b.svc)
		for _, a := range []netip.Addr{v4, v6} {
			if a.IsValid() {
				r.Service.Addresses = append(r.Service.Addresses, Address{IP: a.String(), Family: family(a)})
			}
		}
		return r
	}
	b.related = b.relatedServices()
	b.obs = b.plan(bystander)
	for _, n := range b.nodeNames() {
		b.runs[n] = b.plan(n)
	}
	b.service(&r.Service)
	r.Leases = b.leaseRows()
	r.Nodes = b.nodeRows()
	r.Endpoints = b.endpointRows()
	r.Kernel = b.kernel()
	return r
}

func (b *builder) settings() Settings {
	s := Settings{DaemonNamespace: b.cfg.DaemonNamespace, ServiceElection: b.cfg.Global == nil,
		LeaseDurationSeconds: b.cfg.Timing.LeaseDuration.Seconds(), RenewDeadlineSeconds: b.cfg.Timing.RenewDeadline.Seconds(),
		PodSource: b.detect.PodSource, ServiceSource: b.detect.ServiceSource, PodCIDRs: []string{}, ServiceCIDRs: []string{}}
	for _, p := range b.detect.Pod {
		s.PodCIDRs = append(s.PodCIDRs, p.String())
	}
	for _, p := range b.detect.Service {
		s.ServiceCIDRs = append(s.ServiceCIDRs, p.String())
	}
	return s
}

// ignored says why egressvip does not serve svc ("" when it does), as
// pkg/node's ours does.
func (b *builder) ignored(svc *corev1.Service) string {
	switch {
	case svc.Spec.Type != corev1.ServiceTypeLoadBalancer:
		return fmt.Sprintf("type %s, not LoadBalancer", svc.Spec.Type)
	case b.cfg.Namespace != "" && svc.Namespace != b.cfg.Namespace:
		return fmt.Sprintf("namespace %s is not svc_namespace (%s)", svc.Namespace, b.cfg.Namespace)
	case !b.cfg.Owns(svc.Spec.LoadBalancerClass):
		class := "none"
		if svc.Spec.LoadBalancerClass != nil {
			class = *svc.Spec.LoadBalancerClass
		}
		return fmt.Sprintf("loadBalancerClass %s is not egressvip's (lb_class_name, lb_class_only)", class)
	case annotations.Ignored(svc):
		return annotations.Ignore + " is set"
	}
	return ""
}

// relatedServices are the Services elected with the target or competing
// for its addresses: every Service of ours linked to it by shared
// addresses, sorted by key.
func (b *builder) relatedServices() []*corev1.Service {
	type entry struct {
		svc   *corev1.Service
		addrs []netip.Addr
	}
	var ours []entry
	for _, s := range b.objs.Services {
		if b.ignored(s) != "" {
			continue
		}
		v4, v6, _ := annotations.ServiceLoadBalancerIPs(s)
		var addrs []netip.Addr
		for _, a := range []netip.Addr{v4, v6} {
			if a.IsValid() {
				addrs = append(addrs, a)
			}
		}
		ours = append(ours, entry{s, addrs})
	}
	in := map[types.NamespacedName]bool{b.target: true}
	want := map[netip.Addr]bool{}
	for changed := true; changed; {
		changed = false
		for _, e := range ours {
			key := types.NamespacedName{Namespace: e.svc.Namespace, Name: e.svc.Name}
			if !in[key] && !slices.ContainsFunc(e.addrs, func(a netip.Addr) bool { return want[a] }) {
				continue
			}
			if !in[key] {
				in[key], changed = true, true
			}
			for _, a := range e.addrs {
				if !want[a] {
					want[a], changed = true, true
				}
			}
		}
	}
	var out []*corev1.Service
	for _, e := range ours {
		if in[types.NamespacedName{Namespace: e.svc.Namespace, Name: e.svc.Name}] {
			out = append(out, e.svc)
		}
	}
	slices.SortFunc(out, func(x, y *corev1.Service) int {
		return model.CompareKeys(types.NamespacedName{Namespace: x.Namespace, Name: x.Name}, types.NamespacedName{Namespace: y.Namespace, Name: y.Name})
	})
	return out
}

// nodeNames are every node known from heartbeats, Node objects, the
// target's endpoints and its selected pods, sorted.
func (b *builder) nodeNames() []string {
	set := map[string]bool{}
	for n := range b.beats {
		set[n] = true
	}
	for n := range b.nodeObj {
		set[n] = true
	}
	for _, sl := range b.slices[b.target] {
		for _, e := range sl.Endpoints {
			if e.NodeName != nil && *e.NodeName != "" {
				set[*e.NodeName] = true
			}
		}
	}
	if sel := b.svc.Spec.Selector; len(sel) > 0 {
		for _, p := range b.pods {
			if p.Namespace == b.target.Namespace && p.Spec.NodeName != "" && labels.SelectorFromSet(sel).Matches(labels.Set(p.Labels)) {
				set[p.Spec.NodeName] = true
			}
		}
	}
	if b.local != nil && b.local.Node != "" {
		set[b.local.Node] = true
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// plan analyses, admits and plans the related Services from node's view,
// as that node's daemon does (pkg/node's snapshot and input).
func (b *builder) plan(node string) *run {
	r := &run{node: node, view: election.OfflineView(b.offline(node))}
	nodeAddrs := map[netip.Addr]bool{}
	for a := range b.detect.NodeAddresses {
		nodeAddrs[a] = true
	}
	for n, h := range b.beats {
		if n == node {
			continue
		}
		for _, a := range h.Addresses {
			nodeAddrs[a] = true
		}
	}
	switch h, ok := b.beats[node]; {
	case b.local != nil && node == b.local.Node && b.local.Host != nil:
		r.host = *b.local.Host
	case b.local != nil && node == bystander && b.local.Host != nil:
		// Off any node's own view, the observer's interface is the only
		// one known: its subnets and gateways refuse addresses too.
		r.host = model.Host{Own: b.local.Host.Own, Subnets: b.local.Host.Subnets, Gateways: b.local.Host.Gateways}
	case ok:
		r.host = model.Host{Own: h.Addresses, Up: h.Standing}
	}
	opts := desired.Options{
		Node:          node,
		PodCIDRs:      b.detect.Pod,
		NodeAddresses: nodeAddrs,
		LocalPod:      b.localPod(node),
		LocalPods:     b.localPods(node),
		RemotePod:     b.remotePod,
		MissingIPv6:   b.detect.Missing(true),
	}
	analysed := make([]model.Service, 0, len(b.related))
	for _, s := range b.related {
		key := types.NamespacedName{Namespace: s.Namespace, Name: s.Name}
		a := desired.Analyze(s, b.slices[key], opts)
		if key == b.target {
			r.before = a
			r.before.Problems = slices.Clone(a.Problems)
		}
		analysed = append(analysed, a)
	}
	claimed := map[netip.Addr]string{}
	for key, lv := range r.view.Leases {
		if lv.Kind != model.AddressLease || lv.ClaimedBy == "" {
			continue
		}
		if a, ok := election.AddressOfLease(key.Name); ok {
			claimed[a] = lv.ClaimedBy
		}
	}
	analysed = desired.Admit(analysed, desired.Admission{NodeAddresses: nodeAddrs, Host: r.host,
		Exclude: b.detect.Exclude(), Allowed: b.cfg.Allowed, ClaimedBy: claimed})
	in := plan.Input{
		Node:            node,
		Services:        analysed,
		Election:        r.view,
		DaemonNamespace: b.cfg.DaemonNamespace,
		Global:          b.cfg.Global,
		RetryPeriod:     b.cfg.Timing.RetryPeriod,
		Grace:           b.cfg.Timing.LeaseDuration,
		Settle:          transientSettle,
		Host:            r.host,
		Tunnel:          b.cfg.Tunnel,
	}
	groups, p := plan.Explain(in)
	r.plan = p
	for _, s := range analysed {
		if s.Key == b.target {
			r.svc = s
		}
	}
	for i := range groups {
		if slices.Contains(groups[i].Services, b.target) {
			r.group = &groups[i]
		}
	}
	return r
}

// usable are a node's pods its daemon knows: running or pending.
func usable(p *corev1.Pod) bool {
	return p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed
}

func podIPs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	if len(out) == 0 && p.Status.PodIP != "" {
		if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

func refOf(p *corev1.Pod) desired.PodRef {
	return desired.PodRef{Namespace: p.Namespace, Name: p.Name, HostNetwork: p.Spec.HostNetwork, IPs: podIPs(p),
		Terminating: p.DeletionTimestamp != nil}
}

// localPod finds node's pod by address, as pkg/node's pod index does.
func (b *builder) localPod(node string) func(netip.Addr) (desired.PodRef, bool) {
	return func(a netip.Addr) (desired.PodRef, bool) {
		var found []*corev1.Pod
		for _, p := range b.podsOn[node] {
			if usable(p) && slices.Contains(podIPs(p), a) {
				found = append(found, p)
			}
		}
		if len(found) == 0 {
			return desired.PodRef{}, false
		}
		slices.SortFunc(found, func(x, y *corev1.Pod) int { return strings.Compare(x.Namespace+"/"+x.Name, y.Namespace+"/"+y.Name) })
		ref := refOf(found[0])
		ref.Shared = len(found) > 1
		return ref, true
	}
}

// localPods lists node's pods of a namespace a selector selects.
func (b *builder) localPods(node string) func(string, labels.Selector) []desired.PodRef {
	return func(namespace string, sel labels.Selector) []desired.PodRef {
		var out []desired.PodRef
		for _, p := range b.podsOn[node] {
			if p.Namespace == namespace && usable(p) && sel.Matches(labels.Set(p.Labels)) {
				out = append(out, refOf(p))
			}
		}
		slices.SortFunc(out, func(x, y desired.PodRef) int { return strings.Compare(x.Name, y.Name) })
		return out
	}
}

// remotePod confirms another node's endpoint from the listed pods, as
// pkg/node's verifier does by reading the pod.
func (b *builder) remotePod(namespace, name, node string, addr netip.Addr) (desired.Verdict, string) {
	p := b.pods[types.NamespacedName{Namespace: namespace, Name: name}]
	switch {
	case p == nil:
		return desired.Refused, fmt.Sprintf("there is no pod %s/%s", namespace, name)
	case p.Spec.HostNetwork:
		return desired.Refused, fmt.Sprintf("pod %s/%s is on the host network", namespace, name)
	case node != "" && p.Spec.NodeName != node:
		return desired.Refused, fmt.Sprintf("pod %s/%s runs on %q, not on %q", namespace, name, p.Spec.NodeName, node)
	case !usable(p):
		return desired.Refused, fmt.Sprintf("pod %s/%s has ended", namespace, name)
	case !slices.Contains(podIPs(p), addr):
		return desired.Refused, fmt.Sprintf("%s is not an address of pod %s/%s", addr, namespace, name)
	}
	return desired.Trusted, ""
}

// service fills the Service section from the bystander's view (which
// knows the observer's interface when run on a node).
func (b *builder) service(out *Service) {
	before, s := b.obs.before, b.obs.svc
	for _, a := range before.Addresses() {
		addr := Address{IP: a.String(), Family: family(a), Admitted: slices.Contains(s.Addresses(), a)}
		if !addr.Admitted {
			for _, p := range s.Problems {
				if (p.Reason == desired.EventAddressRefused || p.Reason == desired.EventAddressConflict) &&
					strings.HasPrefix(p.Message, "LoadBalancer IP "+a.String()+" ") {
					addr.Refused = &Problem{Reason: p.Reason, Message: p.Message}
				}
			}
		}
		out.Addresses = append(out.Addresses, addr)
	}
	out.Egress = egress(s)
	out.Invalid = s.Invalid
	out.ReadyNodes = append(out.ReadyNodes, s.ReadyNodes...)
	if g := b.obs.group; g != nil {
		for _, k := range g.Services {
			out.Group = append(out.Group, k.String())
		}
		out.Eligible = append(out.Eligible, g.Decision.Eligible...)
		out.Holder = g.Decision.Holder
		decider := out.Holder
		if decider == "" && len(out.Eligible) > 0 {
			decider = out.Eligible[0]
		}
		if r := b.runs[decider]; r != nil && r.group != nil {
			out.Decision = r.group.Decision.Reason
		}
	}
	out.ReportedBy = b.reporter()
	out.Problems = b.problems(out.ReportedBy)
}

// reporter is the node that raises the Service's Events (plan's rule):
// its holder, else the first eligible node, else the first in the
// Service's own rank of the candidates (with a local endpoint, for traffic
// policy Local).
func (b *builder) reporter() string {
	if g := b.obs.group; g != nil {
		if g.Decision.Holder != "" {
			return g.Decision.Holder
		}
		if len(g.Decision.Eligible) > 0 {
			return g.Decision.Eligible[0]
		}
	}
	s := b.obs.svc
	var nodes []string
	for n, p := range b.obs.view.Peers {
		if !p.Candidate || p.Version < election.ProtocolVersion {
			continue
		}
		if !s.Local || slices.ContainsFunc(s.Endpoints, func(e model.Endpoint) bool { return e.Node == n }) {
			nodes = append(nodes, n)
		}
	}
	slices.Sort(nodes)
	if ranked := election.Rank(b.target.String(), nodes); len(ranked) > 0 {
		return ranked[0]
	}
	return ""
}

// problems are the Warning Events node raises for the Service: those its
// plan raises at once, and its transient ones (raised once they last).
// Without a reporting node, the bystander's analysis.
func (b *builder) problems(node string) []Problem {
	out := []Problem{}
	seen := map[string]bool{}
	add := func(p Problem) {
		if id := p.Reason + "\x00" + p.Message; !seen[id] {
			seen[id] = true
			out = append(out, p)
		}
	}
	r := b.runs[node]
	if r == nil {
		for _, p := range b.obs.svc.Problems {
			add(Problem{Reason: p.Reason, Message: p.Message, Fatal: p.Fatal, Transient: p.Transient})
		}
		return out
	}
	fatal := map[string]bool{}
	for _, p := range r.svc.Problems {
		if p.Fatal {
			fatal[p.Reason+"\x00"+p.Message] = true
		}
	}
	for _, e := range r.plan.Events {
		if e.Warning && e.Service == b.target {
			add(Problem{Reason: e.Reason, Message: e.Message, Fatal: fatal[e.Reason+"\x00"+e.Message]})
		}
	}
	for _, p := range r.svc.Problems {
		if p.Transient {
			add(Problem{Reason: p.Reason, Message: p.Message, Transient: true})
		}
	}
	return out
}

func egress(s model.Service) Egress {
	e := Egress{Enabled: s.Egress, Strict: s.Strict, FlushConntrack: s.FlushConntrack}
	if !s.Egress {
		return e
	}
	if s.EgressIPv4 {
		e.Families = append(e.Families, "IPv4")
	}
	if s.EgressIPv6 {
		e.Families = append(e.Families, "IPv6")
	}
	for _, p := range s.Filter.Ports {
		e.Ports = append(e.Ports, fmt.Sprintf("%s:%d", p.Protocol, p.Port))
	}
	for _, p := range s.Filter.Allow {
		e.Allow = append(e.Allow, p.String())
	}
	for _, p := range s.Filter.Deny {
		e.Deny = append(e.Deny, p.String())
	}
	return e
}

func status(svc *corev1.Service) Status {
	st := Status{VIPHost: svc.Annotations[annotations.VIPHost], ActiveEndpoint: svc.Annotations[annotations.ActiveEndpoint],
		ActiveEndpointIPv6: svc.Annotations[annotations.ActiveEndpoint+"-ipv6"]}
	for _, in := range svc.Status.LoadBalancer.Ingress {
		if in.IP != "" {
			st.Ingress = append(st.Ingress, in.IP)
		}
	}
	return st
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// age rounds now - t to 0.1 s (nil for a zero t).
func age(now, t time.Time) *float64 {
	if t.IsZero() {
		return nil
	}
	s := math.Round(now.Sub(t).Seconds()*10) / 10
	return &s
}

// leaseRows are the target's address Leases, its Service Lease and, with
// svc_election=false, the global Lease.
func (b *builder) leaseRows() []Lease {
	out := []Lease{}
	var keys []types.NamespacedName
	for _, a := range b.obs.before.Addresses() {
		keys = append(keys, types.NamespacedName{Namespace: b.cfg.DaemonNamespace, Name: election.AddressLeaseName(a)})
	}
	keys = append(keys, election.ServiceLeaseKey(b.target))
	if b.cfg.Global != nil {
		keys = append(keys, *b.cfg.Global)
	}
	for _, key := range keys {
		row := Lease{Namespace: key.Namespace, Name: key.Name}
		switch {
		case strings.HasPrefix(key.Name, election.AddressPrefix):
			row.Kind = "address"
			if a, ok := election.AddressOfLease(key.Name); ok {
				row.Address = a.String()
			}
		case strings.HasPrefix(key.Name, election.LeasePrefix):
			row.Kind = "service"
		default:
			row.Kind = "global"
		}
		lv, ok := b.obs.view.Leases[key]
		row.Exists = b.leases[key] != nil
		if ok {
			row.Holder, row.Valid, row.ClaimedBy = lv.Holder, lv.Valid, lv.ClaimedBy
			if lv.Holder != "" {
				row.Writer = writerName(lv.Writer)
			}
		}
		if h, ok := b.beats[row.Holder]; ok && row.Holder != "" {
			row.HeartbeatAgeSeconds, row.LeaseDurationSeconds = age(b.now, h.Renewed), h.Duration.Seconds()
		} else if l := b.leases[key]; l != nil && row.Holder != "" && l.Spec.RenewTime != nil {
			d := b.cfg.Timing.LeaseDuration
			if l.Spec.LeaseDurationSeconds != nil && *l.Spec.LeaseDurationSeconds > 0 {
				d = max(d, time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second)
			}
			row.HeartbeatAgeSeconds, row.LeaseDurationSeconds = age(b.now, l.Spec.RenewTime.Time), d.Seconds()
		}
		out = append(out, row)
	}
	return out
}

func writerName(w model.Writer) string {
	switch w {
	case model.Heartbeat:
		return "heartbeat"
	case model.Legacy:
		return "legacy"
	}
	return "current"
}

// nodeRows are every node with its own planner's decision.
func (b *builder) nodeRows() []Node {
	out := []Node{}
	for _, n := range b.nodeNames() {
		r := b.runs[n]
		row := Node{Name: n, NodeObject: b.nodeObj[n]}
		h, ok := b.beats[n]
		if ok {
			row.Heartbeat, row.Live, row.Version, row.Standing, row.Draining = true, h.Live, h.Version, h.Standing, h.Draining
			row.HeartbeatAgeSeconds, row.LeaseDurationSeconds = age(b.now, h.Renewed), h.Duration.Seconds()
			for _, a := range h.Via {
				row.Via = append(row.Via, a.String())
			}
		}
		if r.group != nil {
			row.Decision, row.Holder = r.group.Decision.Reason, r.group.Decision.Holder
			if i := slices.Index(r.group.Decision.Eligible, n); i >= 0 {
				row.Eligible, row.Rank = true, i+1
			}
		}
		if !row.Eligible {
			row.WhyNot = b.whyNot(n, r, h, ok)
		}
		out = append(out, row)
	}
	return out
}

// whyNot says why node may not hold the Service's group.
func (b *builder) whyNot(node string, r *run, h election.Heartbeat, hasBeat bool) string {
	s := r.svc
	switch {
	case !hasBeat:
		return "no egressvip heartbeat (the daemon does not run there)"
	case !h.Live:
		return "heartbeat expired"
	case h.Version < election.ProtocolVersion:
		return fmt.Sprintf("runs an earlier release (election protocol %d)", h.Version)
	case h.Draining:
		return "draining (shutting down)"
	case !h.Standing || !r.host.Up:
		return "its serviceInterface is missing or down"
	case !r.view.Candidate(node):
		return "heartbeat renewal overdue (older than the renew deadline)"
	case s.Invalid != "":
		return "the Service is not served (" + s.Invalid + ")"
	case r.group == nil:
		return "the Service is not served"
	}
	if b.cfg.Global != nil {
		if lv := r.view.Leases[*b.cfg.Global]; !lv.Valid || lv.Holder != node {
			return "svc_election=false: only the holder of " + b.cfg.Global.String() + " serves"
		}
	}
	if !s.ReadyOn(node) {
		return "no ready endpoint on it (externalTrafficPolicy Local)"
	}
	if r.group.Split {
		return "the Services sharing its address have ready endpoints on other nodes"
	}
	return r.group.Decision.Reason
}

// endpointRows are the Service's pods: those of its EndpointSlices and
// those only their node's pod list shows yet, each judged by its own
// node's daemon.
func (b *builder) endpointRows() []Endpoint {
	eps := map[string]model.Endpoint{}
	for _, e := range b.obs.svc.Endpoints {
		eps[e.Name] = e
	}
	for _, n := range b.nodeNames() {
		for _, e := range b.runs[n].svc.Endpoints {
			if _, ok := eps[e.Name]; !ok && e.Local {
				eps[e.Name] = e
			}
		}
	}
	names := make([]string, 0, len(eps))
	for n := range eps {
		names = append(names, n)
	}
	slices.Sort(names)
	out := []Endpoint{}
	for _, name := range names {
		e := eps[name]
		r := b.runs[e.Node]
		if r == nil {
			r = b.obs
		}
		// The pod's own node's view: it checks the pod against its own
		// pods.
		if i := slices.IndexFunc(r.svc.Endpoints, func(x model.Endpoint) bool { return x.Name == name }); i >= 0 {
			e = r.svc.Endpoints[i]
		}
		row := Endpoint{Name: e.Name, Namespace: e.TargetNamespace, Kind: e.TargetKind, Node: e.Node,
			Ready: e.Ready, Serving: e.Serving, Terminating: e.Terminating, Trusted: e.NoEgress == "", Skipped: e.NoEgress}
		if e.V4.IsValid() {
			row.IPv4 = e.V4.String()
		}
		if e.V6.IsValid() {
			row.IPv6 = e.V6.String()
		}
		row.Egress = b.paths(r, e)
		out = append(out, row)
	}
	return out
}

// paths says how each egressed family of a pod leaves, from its node's
// plan.
func (b *builder) paths(r *run, e model.Endpoint) []Path {
	s := r.svc
	if !b.obs.before.Egress {
		return nil
	}
	var out []Path
	for _, f := range []struct {
		name    string
		on      bool
		pod, lb netip.Addr
		before  netip.Addr
	}{{"IPv4", b.obs.before.EgressIPv4, e.V4, s.LBv4, b.obs.before.LBv4}, {"IPv6", b.obs.before.EgressIPv6, e.V6, s.LBv6, b.obs.before.LBv6}} {
		if !f.on {
			continue
		}
		p := Path{Family: f.name, Mode: PathNone}
		if f.pod.IsValid() {
			p.Pod = f.pod.String()
		}
		switch {
		case r == b.obs:
			p.Why = "its node is unknown"
		case !f.pod.IsValid():
			p.Why = "the pod has no " + f.name + " address"
		case s.Fatal():
			p.Why = "the Service is not served (" + s.Invalid + ")"
		case !f.lb.IsValid() && f.before.IsValid():
			p.Why = "its " + f.name + " LoadBalancer IP is refused"
		case !f.lb.IsValid():
			p.Why = "the Service has no " + f.name + " LoadBalancer IP"
		case e.NoEgress != "":
			p.Why = "not egressed: " + e.NoEgress
		default:
			b.fillPath(r, e, f.pod, &p)
		}
		out = append(out, p)
	}
	return out
}

// fillPath finds the pod's rule in its node's plan.
func (b *builder) fillPath(r *run, e model.Endpoint, pod netip.Addr, p *Path) {
	key := b.target.String()
	dp := r.plan.Datapath
	if i := slices.IndexFunc(dp.SNAT, func(x model.SNATRule) bool { return x.Service == key && x.Pod == pod && !x.Remote }); i >= 0 {
		p.Mode, p.Source, p.Holder = PathSNAT, dp.SNAT[i].Source.String(), r.node
		if r.group != nil && r.group.Decision.Reason != plan.ReasonHolder {
			// Taking the address: until it is bound, the fence drops
			// what would leave with it.
			p.Why = r.node + " is taking the address (" + r.group.Decision.Reason + "); until it is bound its traffic is dropped"
		}
		return
	}
	if i := slices.IndexFunc(dp.Steer, func(x model.SteerRule) bool { return x.Service == key && x.Pod == pod }); i >= 0 {
		st := dp.Steer[i]
		p.Mode, p.Holder, p.Tunnel = PathSteered, st.Holder, st.Tunnel
		for _, v := range st.Via {
			p.Via = append(p.Via, v.String())
		}
		if pod.Is4() {
			p.Source = r.svc.LBv4.String()
		} else {
			p.Source = r.svc.LBv6.String()
		}
		// The holder SNATs what is steered to it only for pods it
		// confirmed.
		if h := b.runs[st.Holder]; h != nil {
			hd := h.plan.Datapath
			switch {
			case slices.ContainsFunc(hd.SNAT, func(x model.SNATRule) bool { return x.Service == key && x.Pod == pod }):
			case slices.ContainsFunc(hd.Hold, func(x model.HoldRule) bool { return x.Service == key && x.Pod == pod }):
				p.Mode, p.Why = PathHeld, "the holder has not confirmed the pod yet: it drops its traffic"
			default:
				why := "the holder does not SNAT it"
				if i := slices.IndexFunc(h.svc.Endpoints, func(x model.Endpoint) bool { return x.Name == e.Name }); i >= 0 && h.svc.Endpoints[i].NoEgress != "" {
					why += ": " + h.svc.Endpoints[i].NoEgress
				}
				p.Why = why
			}
		}
		return
	}
	if slices.ContainsFunc(dp.Hold, func(x model.HoldRule) bool { return x.Service == key && x.Pod == pod }) {
		p.Mode, p.Why = PathHeld, annotations.EgressStrict+": no path to the address right now, its traffic is dropped"
		return
	}
	dec := plan.Decision{}
	if r.group != nil {
		dec = r.group.Decision
	}
	switch {
	case len(r.svc.Filter.Allow) > 0 && !slices.ContainsFunc(r.svc.Filter.Allow, func(x netip.Prefix) bool { return x.Addr().Is4() == pod.Is4() }):
		p.Why = annotations.EgressAllowedNetworks + " allows no " + family(pod) + " network"
	case dec.Holder == "":
		p.Why = "no node holds the address (" + dec.Reason + ")"
	default:
		peer, ok := r.view.Peers[dec.Holder]
		switch {
		case !ok || !peer.Live:
			p.Why = "the holder " + dec.Holder + " is not live"
		case peer.Version < election.ProtocolVersion:
			p.Why = "the holder " + dec.Holder + " runs an earlier release, which takes no steered traffic"
		default:
			p.Why = "the holder " + dec.Holder + " publishes no " + family(pod) + " next hop (and VXLAN mode is off)"
		}
	}
}

// kernel compares the observer's kernel with its plan.
func (b *builder) kernel() *Kernel {
	if b.local == nil {
		return nil
	}
	l := b.local
	k := &Kernel{Node: l.Node, Interface: l.Interface, Addresses: []KernelAddress{}, Steering: []KernelSteer{},
		InterfaceError: l.HostError, AddressesError: l.OwnedError, SteeringError: l.RulesError,
		Firewall: KernelFirewall{Backend: l.Backend, Error: l.FirewallError, Rules: slices.Contains(l.FirewallServices, b.target.String())}}
	r := b.runs[l.Node]
	key := b.target.String()
	for _, a := range b.obs.before.Addresses() {
		k.Addresses = append(k.Addresses, KernelAddress{IP: a.String(), Bound: slices.Contains(l.Owned, a),
			Want: slices.ContainsFunc(r.plan.Bind, func(x model.Binding) bool { return x.Addr == a })})
	}
	dp := r.plan.Datapath
	k.Firewall.Want = slices.ContainsFunc(dp.SNAT, func(x model.SNATRule) bool { return x.Service == key }) ||
		slices.ContainsFunc(dp.Steer, func(x model.SteerRule) bool { return x.Service == key }) ||
		slices.ContainsFunc(dp.Hold, func(x model.HoldRule) bool { return x.Service == key })
	for _, e := range r.svc.Endpoints {
		if !e.Local {
			continue
		}
		for _, pod := range []netip.Addr{e.V4, e.V6} {
			if !pod.IsValid() {
				continue
			}
			ks := KernelSteer{Pod: pod.String(), Rules: []KernelRule{}}
			if i := slices.IndexFunc(r.plan.Routes.Steer, func(x model.SteerRule) bool { return x.Service == key && x.Pod == pod }); i >= 0 {
				ks.Want, ks.Holder = true, r.plan.Routes.Steer[i].Holder
			}
			for _, rule := range l.Rules {
				if rule.Src.Bits() != pod.BitLen() || rule.Src.Addr() != pod {
					continue
				}
				ks.Rules = append(ks.Rules, KernelRule{Priority: rule.Priority, From: rule.Src.Addr().String(), Mark: rule.Mark, Mask: rule.Mask, Table: rule.Table})
				ks.Routes = append(ks.Routes, rule.Routes...)
			}
			k.Steering = append(k.Steering, ks)
		}
	}
	slices.SortFunc(k.Steering, func(x, y KernelSteer) int { return strings.Compare(x.Pod, y.Pod) })
	return k
}
