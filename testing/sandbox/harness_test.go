package sandbox

import (
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func TestPlanNode(t *testing.T) {
	tests := []struct {
		name     string
		i        int
		routed   bool
		ip4, ip6 string
		gw4, gw6 string
	}{
		{name: "one segment, node 1", i: 1, ip4: "198.51.100.11/24", ip6: "2001:db8:100::11/64"},
		{name: "one segment, node 3", i: 3, ip4: "198.51.100.13/24", ip6: "2001:db8:100::13/64"},
		{name: "routed, node 1", i: 1, routed: true, ip4: "198.51.100.18/28", ip6: "2001:db8:100:1::2/64", gw4: "198.51.100.17", gw6: "2001:db8:100:1::1"},
		{name: "routed, node 15", i: 15, routed: true, ip4: "198.51.100.242/28", ip6: "2001:db8:100:f::2/64", gw4: "198.51.100.241", gw6: "2001:db8:100:f::1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := planNode(tc.i, tc.routed)
			if p.ip4.String() != tc.ip4 || p.ip6.String() != tc.ip6 {
				t.Errorf("addresses %s %s, want %s %s", p.ip4, p.ip6, tc.ip4, tc.ip6)
			}
			if tc.routed {
				if p.gw4.String() != tc.gw4 || p.gw6.String() != tc.gw6 {
					t.Errorf("router %s %s, want %s %s", p.gw4, p.gw6, tc.gw4, tc.gw6)
				}
			} else if p.gw4.IsValid() || p.gw6.IsValid() {
				t.Errorf("a router on the one segment: %s %s", p.gw4, p.gw6)
			}
		})
	}
}

// Routed, no two hosts of the node network share a subnet, and every
// subnet lies inside the range the hosts route through the router.
func TestRoutedSubnetsAreDisjoint(t *testing.T) {
	plans := []nodePlan{planControlPlane(true)}
	for i := 1; i <= maxRoutedNodes; i++ {
		plans = append(plans, planNode(i, true))
	}
	for i, a := range plans {
		for _, p := range []netip.Prefix{a.ip4, a.ip6} {
			if !nodeNetwork4.Overlaps(p) && !nodeNetwork6.Overlaps(p) {
				t.Errorf("%s is outside %s and %s", p, nodeNetwork4, nodeNetwork6)
			}
		}
		if !a.ip4.Masked().Contains(a.gw4) || !a.ip6.Masked().Contains(a.gw6) || a.ip4.Addr() == a.gw4 || a.ip6.Addr() == a.gw6 {
			t.Errorf("host %d: router %s %s not a neighbour on %s %s", i, a.gw4, a.gw6, a.ip4, a.ip6)
		}
		for j, b := range plans[i+1:] {
			if a.ip4.Masked().Overlaps(b.ip4.Masked()) || a.ip6.Masked().Overlaps(b.ip6.Masked()) {
				t.Errorf("hosts %d and %d share a subnet: %s %s / %s %s", i, i+1+j, a.ip4, a.ip6, b.ip4, b.ip6)
			}
		}
	}
	if cp := planControlPlane(true); cp.ip4.Addr().String() != apiServerIP {
		t.Errorf("the API server moved to %s", cp.ip4)
	}
}

func TestSamplerRecord(t *testing.T) {
	a, b := netip.MustParseAddr("203.0.113.100"), netip.MustParseAddr("2001:db8:1::100")
	r := SamplerReport{Addrs: map[netip.Addr]*AddrSamples{a: {Addr: a}, b: {Addr: b}}}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rounds := []map[netip.Addr][]string{
		{},
		{a: {"node-1"}},
		{a: {"node-1"}, b: {"node-2"}},
		{a: {"node-1", "node-2"}, b: {"node-2"}},
		{a: {"node-2"}, b: {"node-2"}},
		{a: {"node-2"}},
	}
	for i, h := range rounds {
		r.record(t0.Add(time.Duration(i)*10*time.Millisecond), h)
	}
	tests := []struct {
		name    string
		ip      netip.Addr
		none    int
		double  []string
		changes []string
		first   string
		last    string
	}{
		{
			name: "moved with one double sample", ip: a, none: 1,
			double:  []string{"00:00:00.030 [node-1 node-2]"},
			changes: []string{"00:00:00.010 [node-1]", "00:00:00.030 [node-1 node-2]", "00:00:00.040 [node-2]"},
			first:   "00:00:00.000 []", last: "00:00:00.050 [node-2]",
		},
		{
			name: "came and went", ip: b, none: 3,
			changes: []string{"00:00:00.020 [node-2]", "00:00:00.050 []"},
			first:   "00:00:00.000 []", last: "00:00:00.050 []",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := r.Of(tc.ip)
			strs := func(ss []Sample) []string {
				var out []string
				for _, x := range ss {
					out = append(out, x.String())
				}
				return out
			}
			if s.Samples != len(rounds) || s.None != tc.none {
				t.Errorf("samples %d none %d, want %d and %d", s.Samples, s.None, len(rounds), tc.none)
			}
			if got := strs(s.Double); !slices.Equal(got, tc.double) {
				t.Errorf("double %q, want %q", got, tc.double)
			}
			if got := strs(s.Changes); !slices.Equal(got, tc.changes) {
				t.Errorf("changes %q, want %q", got, tc.changes)
			}
			if s.First.String() != tc.first || s.Last.String() != tc.last {
				t.Errorf("first %q last %q, want %q %q", s.First, s.Last, tc.first, tc.last)
			}
		})
	}
	if r.Rounds != len(rounds) {
		t.Errorf("%d rounds, want %d", r.Rounds, len(rounds))
	}
	if got := r.Of(netip.MustParseAddr("192.0.2.1")); got.Samples != 0 {
		t.Errorf("an address not sampled has %d samples", got.Samples)
	}
}

func TestParseAnswer(t *testing.T) {
	tests := []struct {
		name, line string
		pod, seen  string
		wantErr    bool
	}{
		{name: "IPv4", line: "web-1 203.0.113.250:40000\n", pod: "web-1", seen: "203.0.113.250:40000"},
		{name: "IPv6", line: "web-1 [2001:db8:1::250]:40000\n", pod: "web-1", seen: "[2001:db8:1::250]:40000"},
		{name: "no address", line: "web-1\n", wantErr: true},
		{name: "not an address", line: "web-1 hello\n", wantErr: true},
		{name: "empty", line: "", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r Reply
			err := parseAnswer(tc.line, &r)
			if (err != nil) != tc.wantErr {
				t.Fatalf("error %v, want error %v", err, tc.wantErr)
			}
			if !tc.wantErr && (r.Pod != tc.pod || r.Seen.String() != tc.seen) {
				t.Errorf("got %q %s, want %q %s", r.Pod, r.Seen, tc.pod, tc.seen)
			}
		})
	}
}

// kube-proxy's flags keep it from writing settings outside its node's
// namespace (nf_conntrack_max, the conntrack hashsize) and from the
// per-namespace ones the sandbox does not need.
func TestKubeProxyArgsLeaveTheHostAlone(t *testing.T) {
	c := &Cluster{Dir: "/run/x"}
	n := &Node{Name: "node-1", IP4: netip.MustParseAddr("198.51.100.11"), IP6: netip.MustParseAddr("2001:db8:100::11"),
		ExtIP4: netip.MustParseAddr("203.0.113.11"), ExtIP6: netip.MustParseAddr("2001:db8:1::11")}
	for _, mode := range []string{KubeProxyNFTables, KubeProxyIPTables} {
		args := c.kubeProxyArgs(n, mode)
		for _, want := range []string{
			"--proxy-mode=" + mode,
			"--hostname-override=node-1",
			"--cluster-cidr=" + clusterCIDR,
			"--conntrack-max-per-core=0",
			"--conntrack-tcp-timeout-established=0",
			"--conntrack-tcp-timeout-close-wait=0",
			"--iptables-localhost-nodeports=false",
			"--oom-score-adj=0",
			"--nodeport-addresses=198.51.100.11/32,2001:db8:100::11/128,203.0.113.11/32,2001:db8:1::11/128",
			"--kubeconfig=" + filepath.Join("/run/x", "kube-proxy.kubeconfig"),
		} {
			if !slices.Contains(args, want) {
				t.Errorf("%s: no %s in %q", mode, want, args)
			}
		}
		for _, a := range args {
			if strings.HasPrefix(a, "--conntrack-tcp-be-liberal") || strings.HasPrefix(a, "--conntrack-udp-timeout") {
				t.Errorf("%s: %s writes a conntrack setting", mode, a)
			}
		}
	}
	if validKubeProxyMode("ipvs") == nil || validKubeProxyMode("") == nil {
		t.Error("ipvs and the empty mode are accepted")
	}
}

func TestHasArg(t *testing.T) {
	f := strings.Fields(`-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y`)
	if !hasArg(f, "-d", "10.96.0.1/32") || !hasArg(f, "--dport", "443") || hasArg(f, "--dport", "10.96.0.1/32") || hasArg(f, "-j", "x") {
		t.Error("hasArg misreads the rule")
	}
}

func TestMergeRules(t *testing.T) {
	leasesOld := rbacv1.PolicyRule{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "create", "update"}}
	leasesNew := rbacv1.PolicyRule{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "list", "watch", "create", "update"}}
	services := rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"list", "watch", "patch"}}
	tests := []struct {
		name      string
		have, add []rbacv1.PolicyRule
		want      []rbacv1.PolicyRule
	}{
		{name: "equal lists", have: []rbacv1.PolicyRule{services}, add: []rbacv1.PolicyRule{services}, want: []rbacv1.PolicyRule{services}},
		{name: "a narrower rule is added, nothing removed", have: []rbacv1.PolicyRule{services, leasesNew}, add: []rbacv1.PolicyRule{services, leasesOld},
			want: []rbacv1.PolicyRule{services, leasesNew, leasesOld}},
		{name: "into nothing", add: []rbacv1.PolicyRule{leasesOld}, want: []rbacv1.PolicyRule{leasesOld}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := mergeRules(tc.have, tc.add)
			if len(got) != len(tc.want) {
				t.Fatalf("got %d rules %v, want %v", len(got), got, tc.want)
			}
			for i := range got {
				if !slices.Equal(got[i].Verbs, tc.want[i].Verbs) || !slices.Equal(got[i].Resources, tc.want[i].Resources) {
					t.Errorf("rule %d = %v, want %v", i, got[i], tc.want[i])
				}
			}
		})
	}
	sa := rbacv1.Subject{Kind: "ServiceAccount", Name: "egressvip", Namespace: "egressvip"}
	other := rbacv1.Subject{Kind: "User", Name: "someone"}
	if got := mergeSubjects([]rbacv1.Subject{sa}, []rbacv1.Subject{sa, other}); !slices.Equal(got, []rbacv1.Subject{sa, other}) {
		t.Errorf("mergeSubjects = %v", got)
	}
}

func requireGit(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("needs git")
	}
	if _, err := git("rev-parse", "HEAD"); err != nil {
		t.Skipf("the checkout is not a git repository: %v", err)
	}
}

func TestResolveCommit(t *testing.T) {
	requireGit(t)
	head, err := resolveCommit("HEAD")
	if err != nil || len(head) != 40 {
		t.Fatalf("HEAD = %q, %v", head, err)
	}
	for _, c := range []string{"", "--output=/tmp/x", "0123456789abcdef0123456789abcdef01234567"} {
		if _, err := resolveCommit(c); err == nil {
			t.Errorf("%q resolved", c)
		}
	}
	if _, err := resolveCommit("0123456789abcdef0123456789abcdef01234567"); err == nil || !strings.Contains(err.Error(), "not in this repository's history") {
		t.Errorf("unknown commit: %v", err)
	}
	// A shallow clone lacks the history: the error says so.
	dir := t.TempDir()
	if out, err := exec.Command("git", "clone", "-q", "--depth=1", "file://"+repoRoot(), dir).CombinedOutput(); err != nil {
		t.Skipf("cannot make a shallow clone: %v\n%s", err, out)
	}
	parent, err := git("rev-parse", "HEAD~1")
	if err != nil {
		t.Skipf("no parent commit: %v", err)
	}
	if _, err := resolveCommitIn(dir, strings.TrimSpace(parent)); err == nil || !strings.Contains(err.Error(), "shallow clone") {
		t.Errorf("a commit outside a shallow clone: %v, want an error naming the shallow clone", err)
	}
}

func TestReleaseManifest(t *testing.T) {
	requireGit(t)
	objs, err := manifestObjectsAt("HEAD", "rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(objs, func(o runtime.Object) bool { _, ok := o.(*rbacv1.ClusterRole); return ok }) {
		t.Errorf("no ClusterRole in manifests/rbac.yaml at HEAD: %v", objs)
	}
	if _, err := ReleaseManifest("HEAD", "no-such-file.yaml"); err == nil {
		t.Error("a missing manifest was read")
	}
	ds, err := daemonSpecAt("HEAD")
	if err != nil || len(ds.Spec.Template.Spec.Containers) == 0 {
		t.Fatalf("DaemonSet at HEAD: %v", err)
	}
}
