package explain

import (
	"bytes"
	"encoding/json"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/plan"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func key(ns, name string) types.NamespacedName {
	return types.NamespacedName{Namespace: ns, Name: name}
}

func nodeRow(t *testing.T, r Report, name string) Node {
	t.Helper()
	i := slices.IndexFunc(r.Nodes, func(n Node) bool { return n.Name == name })
	if i < 0 {
		t.Fatalf("no node %s in %+v", name, r.Nodes)
	}
	return r.Nodes[i]
}

func endpointRow(t *testing.T, r Report, name string) Endpoint {
	t.Helper()
	i := slices.IndexFunc(r.Endpoints, func(e Endpoint) bool { return e.Name == name })
	if i < 0 {
		t.Fatalf("no endpoint %s in %+v", name, r.Endpoints)
	}
	return r.Endpoints[i]
}

func hasProblem(r Report, reason, fragment string) bool {
	return slices.ContainsFunc(r.Service.Problems, func(p Problem) bool {
		return p.Reason == reason && strings.Contains(p.Message, fragment)
	})
}

// localNodeA is node-a's kernel: nothing bound, the firewall has the
// Service's rules, and client-0 (10.244.1.5) is steered.
func localNodeA() *Local {
	return &Local{Node: "node-a", Interface: "eth0", Host: &model.Host{Own: []netip.Addr{netip.MustParseAddr("198.51.100.11")},
		Subnets: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}, Up: true},
		Backend: "nftables", FirewallServices: []string{"default/sip-client"},
		Rules: []LocalRule{{Priority: 31000, Src: netip.MustParsePrefix("10.244.1.5/32"), Mark: 0x1000, Mask: 0x1000, Table: 59136,
			Routes: []string{"default via 198.51.100.12 dev eth0 onlink"}}}}
}

func TestBuild(t *testing.T) {
	sip := key("default", "sip-client")
	tests := []struct {
		name    string
		cluster func() *cluster
		cfg     func(*Config)
		target  types.NamespacedName
		local   *Local
		check   func(t *testing.T, r Report)
	}{
		{
			name:    "served: the holder SNATs its own pod, the other is steered to it",
			cluster: served,
			target:  sip,
			check: func(t *testing.T, r Report) {
				s := r.Service
				if !s.Found || s.Ignored != "" || s.Invalid != "" || s.Holder != "node-b" || s.Decision != plan.ReasonHolder || s.ReportedBy != "node-b" {
					t.Errorf("service %+v", s)
				}
				if want := election.Rank("203.0.113.10", []string{"node-a", "node-b"}); !slices.Equal(s.Eligible, want) {
					t.Errorf("eligible %v, want %v", s.Eligible, want)
				}
				if !slices.Equal(s.ReadyNodes, []string{"node-a", "node-b"}) || !slices.Equal(s.Egress.Families, []string{"IPv4"}) ||
					!slices.Equal(s.Egress.Ports, []string{"udp:5060"}) || len(s.Problems) != 0 {
					t.Errorf("service %+v", s)
				}
				if len(s.Addresses) != 1 || !s.Addresses[0].Admitted {
					t.Errorf("addresses %+v", s.Addresses)
				}
				if len(r.Leases) != 2 || !r.Leases[0].Valid || r.Leases[0].Holder != "node-b" || r.Leases[0].ClaimedBy != "default" ||
					r.Leases[0].Writer != "current" || !r.Leases[1].Valid || r.Leases[1].Kind != "service" ||
					r.Leases[0].HeartbeatAgeSeconds == nil || *r.Leases[0].HeartbeatAgeSeconds != 0.4 {
					t.Errorf("leases %+v", r.Leases)
				}
				a, b, c := nodeRow(t, r, "node-a"), nodeRow(t, r, "node-b"), nodeRow(t, r, "node-c")
				if !a.Eligible || a.Decision != plan.ReasonHeldElsewhere || a.Holder != "node-b" {
					t.Errorf("node-a %+v", a)
				}
				if !b.Eligible || b.Decision != plan.ReasonHolder || b.Rank == 0 {
					t.Errorf("node-b %+v", b)
				}
				if c.Eligible || c.Rank != 0 || !strings.Contains(c.WhyNot, "no ready endpoint") {
					t.Errorf("node-c %+v", c)
				}
				p0 := endpointRow(t, r, "sip-client-0").Egress
				if len(p0) != 1 || p0[0].Mode != PathSteered || p0[0].Holder != "node-b" || !slices.Equal(p0[0].Via, []string{"198.51.100.12"}) ||
					p0[0].Source != "203.0.113.10" || p0[0].Why != "" {
					t.Errorf("sip-client-0 %+v", p0)
				}
				p1 := endpointRow(t, r, "sip-client-1").Egress
				if len(p1) != 1 || p1[0].Mode != PathSNAT || p1[0].Holder != "node-b" || p1[0].Source != "203.0.113.10" {
					t.Errorf("sip-client-1 %+v", p1)
				}
				if r.Kernel != nil {
					t.Errorf("kernel %+v off the nodes", r.Kernel)
				}
			},
		},
		{
			name:    "served, on node-a: the kernel steers its pod as planned",
			cluster: served,
			target:  sip,
			local:   localNodeA(),
			check: func(t *testing.T, r Report) {
				k := r.Kernel
				if r.Observer != "node-a" || k == nil {
					t.Fatalf("observer %q kernel %+v", r.Observer, k)
				}
				if len(k.Addresses) != 1 || k.Addresses[0].Bound || k.Addresses[0].Want {
					t.Errorf("addresses %+v", k.Addresses)
				}
				if !k.Firewall.Rules || !k.Firewall.Want || k.Firewall.Backend != "nftables" {
					t.Errorf("firewall %+v", k.Firewall)
				}
				if len(k.Steering) != 1 || !k.Steering[0].Want || k.Steering[0].Holder != "node-b" || len(k.Steering[0].Rules) != 1 ||
					k.Steering[0].Rules[0].Table != 59136 {
					t.Errorf("steering %+v", k.Steering)
				}
			},
		},
		{
			name: "refused address: a Node's address is refused, the other family is served",
			cluster: func() *cluster {
				c := newCluster()
				c.service("default", "dual", "198.51.100.12,2001:db8:1::20", false, false)
				return c
			},
			target: key("default", "dual"),
			check: func(t *testing.T, r Report) {
				s := r.Service
				if len(s.Addresses) != 2 || s.Addresses[0].Admitted || s.Addresses[0].Refused == nil ||
					s.Addresses[0].Refused.Reason != desired.EventAddressRefused || !strings.Contains(s.Addresses[0].Refused.Message, "a Node's address") ||
					!s.Addresses[1].Admitted || s.Addresses[1].Family != "IPv6" {
					t.Errorf("addresses %+v", s.Addresses)
				}
				if s.Invalid != "" || len(s.Eligible) != 3 || s.Holder != "" || s.Decision != plan.ReasonAcquiring {
					t.Errorf("service %+v", s)
				}
				if !hasProblem(r, desired.EventAddressRefused, "198.51.100.12") {
					t.Errorf("problems %+v", s.Problems)
				}
				// Every address Lease is listed, the refused one too.
				if len(r.Leases) != 3 || r.Leases[0].Exists || r.Leases[0].Address != "198.51.100.12" {
					t.Errorf("leases %+v", r.Leases)
				}
				first := nodeRow(t, r, s.Eligible[0])
				if first.Rank != 1 || first.Decision != plan.ReasonAcquiring {
					t.Errorf("first in rank %+v", first)
				}
				second := nodeRow(t, r, s.Eligible[1])
				if second.Rank != 2 || second.Decision != plan.ReasonWaitingTurn {
					t.Errorf("second in rank %+v", second)
				}
			},
		},
		{
			name: "refused address: another namespace claimed it first",
			cluster: func() *cluster {
				c := served()
				c.service("attacker", "thief", "203.0.113.10", true, false)
				return c
			},
			target: key("attacker", "thief"),
			check: func(t *testing.T, r Report) {
				s := r.Service
				if len(s.Addresses) != 1 || s.Addresses[0].Admitted || s.Addresses[0].Refused == nil ||
					s.Addresses[0].Refused.Reason != desired.EventAddressConflict || s.Invalid != desired.ReasonRefused {
					t.Errorf("service %+v", s)
				}
				if len(s.Eligible) != 0 || s.Holder != "" {
					t.Errorf("an unserved Service has eligible %v holder %q", s.Eligible, s.Holder)
				}
				if !hasProblem(r, desired.EventAddressConflict, "another namespace") || hasProblem(r, "", "sip-client") {
					t.Errorf("problems %+v", s.Problems)
				}
				if n := nodeRow(t, r, "node-a"); n.Eligible || !strings.Contains(n.WhyNot, "not served") {
					t.Errorf("node-a %+v", n)
				}
			},
		},
		{
			name: "skipped endpoints: another namespace's pod and a hostNetwork address keep the node's address",
			cluster: func() *cluster {
				c := served()
				c.pod("other", "intruder", "x", "node-a", podIP("node-a", 9))
				c.objs.EndpointSlices[0].Endpoints = append(c.objs.EndpointSlices[0].Endpoints,
					endpointOf(endpoint{pod: "intruder", ns: "other", node: "node-a", ip: podIP("node-a", 9), ready: true}),
					endpointOf(endpoint{pod: "hostnet", ns: "default", node: "node-b", ip: nodeIP("node-b"), ready: true}))
				return c
			},
			target: sip,
			check: func(t *testing.T, r Report) {
				in := endpointRow(t, r, "intruder")
				if in.Trusted || !strings.Contains(in.Skipped, "not a Pod of namespace default") || len(in.Egress) != 1 ||
					in.Egress[0].Mode != PathNone || !strings.HasPrefix(in.Egress[0].Why, "not egressed: ") {
					t.Errorf("intruder %+v", in)
				}
				hn := endpointRow(t, r, "hostnet")
				if hn.Trusted || !strings.Contains(hn.Skipped, "is a Node's address") {
					t.Errorf("hostnet %+v", hn)
				}
				if ok := endpointRow(t, r, "sip-client-0"); !ok.Trusted || ok.Egress[0].Mode != PathSteered {
					t.Errorf("sip-client-0 %+v", ok)
				}
				// node-b holds and reports: it sees both endpoints.
				if !hasProblem(r, desired.EventEndpointNotEgressed, "endpoint intruder") || !hasProblem(r, desired.EventEndpointNotEgressed, "endpoint hostnet") {
					t.Errorf("problems %+v", r.Service.Problems)
				}
				if r.Service.Holder != "node-b" {
					t.Errorf("holder %q", r.Service.Holder)
				}
			},
		},
		{
			name: "skipped endpoint: a slice names a pod that is not on the node it says",
			cluster: func() *cluster {
				c := served()
				c.pod("default", "liar", "other", "node-c", podIP("node-c", 4))
				c.objs.EndpointSlices[0].Endpoints = append(c.objs.EndpointSlices[0].Endpoints,
					endpointOf(endpoint{pod: "liar", ns: "default", node: "node-a", ip: podIP("node-a", 4), ready: false}))
				return c
			},
			target: sip,
			check: func(t *testing.T, r Report) {
				e := endpointRow(t, r, "liar")
				if e.Trusted || !strings.Contains(e.Skipped, "is not the address of a pod on this node") {
					t.Errorf("liar %+v", e)
				}
				// The holder refuses it too, from the pod itself.
				if !hasProblem(r, desired.EventEndpointNotEgressed, `runs on "node-c", not on "node-a"`) {
					t.Errorf("problems %+v", r.Service.Problems)
				}
			},
		},
		{
			name: "no eligible node: the only pod is not ready (policy Local)",
			cluster: func() *cluster {
				c := newCluster()
				c.service("default", "batch", "203.0.113.30", true, true)
				c.pod("default", "batch-0", "batch", "node-c", podIP("node-c", 3))
				c.slice("default", "batch", endpoint{pod: "batch-0", ns: "default", node: "node-c", ip: podIP("node-c", 3), ready: false})
				return c
			},
			target: key("default", "batch"),
			check: func(t *testing.T, r Report) {
				s := r.Service
				if len(s.Eligible) != 0 || s.Holder != "" || len(s.ReadyNodes) != 0 || s.Invalid != "" {
					t.Errorf("service %+v", s)
				}
				for _, n := range r.Nodes {
					if n.Eligible || n.Decision != plan.ReasonNotEligible || !strings.Contains(n.WhyNot, "no ready endpoint") {
						t.Errorf("node %+v", n)
					}
				}
				e := endpointRow(t, r, "batch-0")
				if !e.Trusted || e.Ready || len(e.Egress) != 1 || e.Egress[0].Mode != PathNone || !strings.Contains(e.Egress[0].Why, "no node holds the address") {
					t.Errorf("batch-0 %+v", e)
				}
			},
		},
		{
			name: "no eligible node: every heartbeat expired",
			cluster: func() *cluster {
				c := served()
				for _, n := range nodes {
					c.heartbeat(n, 6*time.Second, `{"version":2,"standing":true}`)
				}
				return c
			},
			target: sip,
			check: func(t *testing.T, r Report) {
				if len(r.Service.Eligible) != 0 || r.Service.Holder != "" || r.Leases[0].Valid || r.Leases[0].Holder != "node-b" {
					t.Errorf("service %+v leases %+v", r.Service, r.Leases)
				}
				for _, n := range r.Nodes {
					if n.Live || n.WhyNot != "heartbeat expired" {
						t.Errorf("node %+v", n)
					}
				}
				if p := endpointRow(t, r, "sip-client-0").Egress[0]; p.Mode != PathNone {
					t.Errorf("path %+v", p)
				}
			},
		},
		{
			name: "strict: with no node to hold the address the pods' traffic is held",
			cluster: func() *cluster {
				c := served()
				c.objs.Services[0].Annotations["egressvip.io/egress-strict"] = "true"
				c.heartbeat("node-a", 0, `{"version":2,"standing":false}`)
				c.heartbeat("node-b", 6*time.Second, `{"version":2,"standing":true}`)
				return c
			},
			target: sip,
			check: func(t *testing.T, r Report) {
				if p := endpointRow(t, r, "sip-client-0").Egress[0]; p.Mode != PathHeld || !strings.Contains(p.Why, "egress-strict") {
					t.Errorf("path %+v", p)
				}
				if n := nodeRow(t, r, "node-a"); n.Eligible || !strings.Contains(n.WhyNot, "serviceInterface") {
					t.Errorf("node-a %+v", n)
				}
			},
		},
		{
			name: "the holder left: the next in rank is taking the address",
			cluster: func() *cluster {
				c := served()
				c.heartbeat("node-b", 6*time.Second, `{"version":2,"standing":true}`)
				return c
			},
			target: sip,
			check: func(t *testing.T, r Report) {
				p := endpointRow(t, r, "sip-client-0").Egress[0]
				if p.Mode != PathSNAT || p.Holder != "node-a" || !strings.Contains(p.Why, "taking the address (acquiring)") {
					t.Errorf("path %+v", p)
				}
				if r.Service.Holder != "" || !slices.Equal(r.Service.Eligible, []string{"node-a"}) || r.Service.Decision != plan.ReasonAcquiring {
					t.Errorf("service %+v", r.Service)
				}
			},
		},
		{
			name: "svc_election=false: only the global Lease's holder is eligible",
			cluster: func() *cluster {
				c := served()
				c.service("default", "web", "203.0.113.40", false, false)
				holder := "node-c"
				c.objs.Leases = append(c.objs.Leases, globalLease(holder))
				return c
			},
			cfg:    func(cfg *Config) { cfg.Global = &types.NamespacedName{Namespace: daemonNS, Name: "egressvip.services"} },
			target: key("default", "web"),
			check: func(t *testing.T, r Report) {
				if !slices.Equal(r.Service.Eligible, []string{"node-c"}) || len(r.Leases) != 3 || r.Leases[2].Kind != "global" {
					t.Errorf("service %+v leases %+v", r.Service, r.Leases)
				}
				if n := nodeRow(t, r, "node-a"); !strings.Contains(n.WhyNot, "svc_election=false") {
					t.Errorf("node-a %+v", n)
				}
			},
		},
		{
			name:    "not found",
			cluster: served,
			target:  key("default", "nope"),
			check: func(t *testing.T, r Report) {
				if r.Service.Found || len(r.Nodes) != 0 {
					t.Errorf("report %+v", r)
				}
			},
		},
		{
			name: "another class is ignored",
			cluster: func() *cluster {
				c := newCluster()
				s := c.service("default", "foreign", "203.0.113.50", true, true)
				class := "metallb"
				s.Spec.LoadBalancerClass = &class
				return c
			},
			target: key("default", "foreign"),
			check: func(t *testing.T, r Report) {
				if !r.Service.Found || !strings.Contains(r.Service.Ignored, "metallb") || len(r.Service.Addresses) != 1 {
					t.Errorf("service %+v", r.Service)
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			r := Build(tc.target, now, tc.cluster().objs, cfg, tc.local)
			tc.check(t, r)
			// Every report renders, and survives JSON.
			var buf bytes.Buffer
			if err := Render(&buf, r); err != nil {
				t.Fatal(err)
			}
			roundTrip(t, r)
		})
	}
}

func globalLease(holder string) *coordinationv1.Lease {
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: daemonNS, Name: "egressvip.services",
			Labels: map[string]string{election.LabelManagedBy: election.ManagedBy, election.LabelRole: election.RoleGlobal}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder},
	}
}

func endpointOf(e endpoint) discoveryv1.Endpoint {
	c := &cluster{}
	c.slice("x", "x", e)
	return c.objs.EndpointSlices[0].Endpoints[0]
}

func roundTrip(t *testing.T, r Report) {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, r) {
		t.Errorf("JSON round trip changed the report:\n got %+v\nwant %+v", back, r)
	}
}

// TestBuildIsDeterministic builds the same report from shuffled inputs.
func TestBuildIsDeterministic(t *testing.T) {
	c := served()
	c.pod("other", "intruder", "x", "node-a", podIP("node-a", 9))
	want := Build(key("default", "sip-client"), now, c.objs, testConfig(), localNodeA())
	for i := range 5 {
		objs := c.objs
		objs.Leases = slices.Clone(objs.Leases)
		objs.Pods = slices.Clone(objs.Pods)
		objs.Nodes = slices.Clone(objs.Nodes)
		slices.Reverse(objs.Leases)
		slices.Reverse(objs.Pods)
		if i%2 == 0 {
			slices.Reverse(objs.Nodes)
		}
		if got := Build(key("default", "sip-client"), now, objs, testConfig(), localNodeA()); !reflect.DeepEqual(got, want) {
			t.Fatalf("run %d differs:\n got %+v\nwant %+v", i, got, want)
		}
	}
}

// TestGolden renders the served Service (on node-a, masked) and the other
// three golden cases, text and JSON, against testdata; -update rewrites
// them.
func TestGolden(t *testing.T) {
	cases := []struct {
		file   string
		c      func() *cluster
		target types.NamespacedName
		local  *Local
	}{
		{"served", served, key("default", "sip-client"), localNodeA()},
		{"refused", func() *cluster {
			c := newCluster()
			c.service("default", "dual", "198.51.100.12,2001:db8:1::20", false, false)
			return c
		}, key("default", "dual"), nil},
		{"skipped", func() *cluster {
			c := served()
			c.objs.EndpointSlices[0].Endpoints = append(c.objs.EndpointSlices[0].Endpoints,
				endpointOf(endpoint{pod: "hostnet", ns: "default", node: "node-b", ip: nodeIP("node-b"), ready: true}))
			return c
		}, key("default", "sip-client"), nil},
		{"no-eligible", func() *cluster {
			c := newCluster()
			c.service("default", "batch", "203.0.113.30", true, true)
			c.pod("default", "batch-0", "batch", "node-c", podIP("node-c", 3))
			c.slice("default", "batch", endpoint{pod: "batch-0", ns: "default", node: "node-c", ip: podIP("node-c", 3), ready: false})
			return c
		}, key("default", "batch"), nil},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			r := MaskVolatile(Build(tc.target, now, tc.c().objs, testConfig(), tc.local))
			var text, js bytes.Buffer
			if err := Render(&text, r); err != nil {
				t.Fatal(err)
			}
			if err := JSON(&js, r); err != nil {
				t.Fatal(err)
			}
			golden(t, tc.file+".txt", text.Bytes())
			golden(t, tc.file+".json", js.Bytes())
		})
	}
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (go test -update rewrites it):\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}

func TestMaskVolatileLeavesTheOriginal(t *testing.T) {
	r := Build(key("default", "sip-client"), now, served().objs, testConfig(), localNodeA())
	m := MaskVolatile(r)
	if !m.Time.IsZero() || m.Nodes[0].HeartbeatAgeSeconds != nil || m.Leases[0].HeartbeatAgeSeconds != nil || m.Kernel.Steering[0].Rules[0].Table != 0 {
		t.Errorf("masked %+v", m)
	}
	if r.Time.IsZero() || r.Nodes[0].HeartbeatAgeSeconds == nil || r.Leases[0].HeartbeatAgeSeconds == nil || r.Kernel.Steering[0].Rules[0].Table == 0 {
		t.Errorf("the original changed: %+v", r)
	}
	var buf bytes.Buffer
	if err := Render(&buf, m); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "0.4s") || strings.Contains(buf.String(), "59136") || strings.Contains(buf.String(), "2026") {
		t.Errorf("masked text shows volatile values:\n%s", buf.String())
	}
}
