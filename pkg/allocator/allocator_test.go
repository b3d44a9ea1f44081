package allocator

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"
)

const ourClass = "kube-vip.io/kube-vip-class"

func ours(s *corev1.Service) bool {
	return s.Spec.Type == corev1.ServiceTypeLoadBalancer && (s.Spec.LoadBalancerClass == nil || *s.Spec.LoadBalancerClass == ourClass)
}

func newAllocator(t testing.TB, c Client, rec *recorder, clk clock.Clock, refuse func(netip.Addr) string) *Allocator {
	return New(Config{
		Client: c, ClaimNamespace: daemonNS, Ours: ours, Refuse: refuse, Recorder: rec,
		Log: testLog(t.(*testing.T)), Clock: clk,
	})
}

func TestAllocatesLikeKubeVipCloudProvider(t *testing.T) {
	api := newFakeAPI()
	api.setConfig(t, map[string]string{
		"range-global":         "10.0.0.1-10.0.0.10,2001:db8::1-2001:db8::10",
		"cidr-team":            "192.168.0.200/29",
		"skip-end-ips-in-cidr": "true",
		"interface-team":       "eth3",
	})
	other := "example.com/other"
	for _, s := range []*corev1.Service{
		lbService("default", "pre", annotated("10.0.0.4")),
		lbService("default", "lbip", func(s *corev1.Service) { s.Spec.LoadBalancerIP = "10.0.0.6" }),
		lbService("default", "foreign", func(s *corev1.Service) { s.Spec.LoadBalancerClass = &other }),
		lbService("default", "clusterip", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeClusterIP }),
		lbService("default", "a"),
		lbService("default", "b", dual(corev1.IPFamilyPolicyRequireDualStack, corev1.IPv6Protocol, corev1.IPv4Protocol)),
		lbService("default", "c", dual(corev1.IPFamilyPolicyPreferDualStack, corev1.IPv4Protocol)),
		lbService("team", "d"),
		lbService("default", "e"),
		lbService("default", "v6", dual(corev1.IPFamilyPolicySingleStack, corev1.IPv6Protocol)),
	} {
		api.create(t, s)
	}
	rec := &recorder{}
	a := newAllocator(t, newTestClient(api, 0), rec, clocktesting.NewFakeClock(time.Now()), func(a netip.Addr) string {
		if a == mustAddr("10.0.0.2") {
			return "a node's address"
		}
		return ""
	})
	start(t, a)
	want := map[string]string{
		"default/pre":       "10.0.0.4",
		"default/lbip":      "",
		"default/foreign":   "",
		"default/clusterip": "",
		"default/a":         "10.0.0.1",
		"default/b":         "2001:db8::1,10.0.0.3",
		"default/c":         "10.0.0.5,2001:db8::2",
		"team/d":            "192.168.0.201",
		"default/e":         "10.0.0.7",
		"default/v6":        "2001:db8::3",
	}
	waitFor(t, "every Service allocated", 10*time.Second, func() bool {
		got := api.addresses(t)
		for k, v := range want {
			if v != "" && got[k] == "" {
				return false
			}
		}
		return len(rec.matching("AddressAllocated")) == 6
	})
	got := api.addresses(t)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: got %q, want %q", k, got[k], v)
		}
	}
	d, _ := api.CoreV1().Services("team").Get(context.Background(), "d", metav1.GetOptions{})
	if d.Labels[LabelImplementation] != ImplementationValue || d.Annotations[AnnotationServiceInterface] != "eth3" {
		t.Errorf("team/d: labels %v annotations %v; want implementation=kube-vip and the serviceInterface", d.Labels, d.Annotations)
	}
	claims := api.claimLeases(t)
	for _, a := range []string{"10.0.0.1", "10.0.0.3", "10.0.0.5", "10.0.0.7", "2001:db8::1", "2001:db8::2", "2001:db8::3", "192.168.0.201"} {
		l := claims[a]
		if l == nil {
			t.Errorf("no claim for %s", a)
			continue
		}
		wantNS := "default"
		if a == "192.168.0.201" {
			wantNS = "team"
		}
		if *l.Spec.HolderIdentity != wantNS || l.Name != ClaimName(mustAddr(a)) {
			t.Errorf("claim %s: holder %q name %q", a, *l.Spec.HolderIdentity, l.Name)
		}
	}
	if len(claims) != 8 {
		t.Errorf("%d claims, want 8", len(claims))
	}
	if n := len(rec.matching("Normal default/b AddressAllocated", "2001:db8::1,10.0.0.3", "range-global")); n != 1 {
		t.Errorf("%d AddressAllocated Events for default/b, want 1: %v", n, rec.matching())
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(a.Collectors()...)
	// used: .1 .3 .4 .5 .6 .7 (10 addresses, none ending in .0 or .255).
	waitFor(t, "pool gauges", 5*time.Second, func() bool {
		return gauge(t, reg, "egressvip_pool_addresses", "range-global", "ipv4", "used") == 6
	})
	if v := gauge(t, reg, "egressvip_pool_addresses", "range-global", "ipv4", "free"); v != 4 {
		t.Errorf("free IPv4 of range-global = %v, want 4", v)
	}
	if v := gauge(t, reg, "egressvip_pool_addresses", "range-global", "ipv6", "used"); v != 3 {
		t.Errorf("used IPv6 of range-global = %v, want 3", v)
	}
}

// gauge reads the sample of a pool gauge from the exposition text; -1 if
// absent.
func gauge(t *testing.T, reg *prometheus.Registry, name, pool, family, state string) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	prefix := fmt.Sprintf(`%s{family=%q,pool=%q,state=%q} `, name, family, pool, state)
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return -1
}

func TestFullPoolWarnsOnceAndRecoversWhenAClaimIsFreed(t *testing.T) {
	api := newFakeAPI()
	api.setConfig(t, map[string]string{"range-global": "10.0.0.1-10.0.0.2"})
	for _, n := range []string{"s1", "s2", "s3"} {
		api.create(t, lbService("default", n))
	}
	rec := &recorder{}
	clk := clocktesting.NewFakeClock(time.Now())
	a := newAllocator(t, newTestClient(api, 0), rec, clk, nil)
	start(t, a)
	waitFor(t, "AllocationFailed on s3", 10*time.Second, func() bool {
		return len(rec.matching("Warning default/s3 AllocationFailed", "pool range-global has no free ipv4 address")) > 0
	})
	// More passes (a ConfigMap change, a new Service) do not repeat it.
	api.setConfig(t, map[string]string{"range-global": "10.0.0.1-10.0.0.2", "search-order": "asc"})
	api.create(t, lbService("default", "s4"))
	waitFor(t, "AllocationFailed on s4", 10*time.Second, func() bool {
		return len(rec.matching("Warning default/s4 AllocationFailed")) > 0
	})
	if n := len(rec.matching("Warning default/s3 AllocationFailed")); n != 1 {
		t.Errorf("%d AllocationFailed Events on s3, want 1", n)
	}

	// s1 goes: its claim is freed after ClaimGrace, and s3 (the oldest
	// waiting) gets its address.
	freed := api.addresses(t)["default/s1"]
	if err := api.CoreV1().Services("default").Delete(context.Background(), "s1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "s3 allocated", 20*time.Second, func() bool {
		if api.addresses(t)["default/s3"] != "" {
			return true
		}
		if clk.HasWaiters() {
			clk.Step(DefaultGCInterval)
		}
		return false
	})
	if got := api.addresses(t)["default/s3"]; got != freed {
		t.Errorf("s3 got %q, want the freed %q", got, freed)
	}
	if api.addresses(t)["default/s4"] != "" {
		t.Errorf("s4 got an address from a full pool")
	}
}

func TestClaimIsNotFreedWithinGraceNorWhileAServiceCarriesIt(t *testing.T) {
	api := newFakeAPI()
	api.setConfig(t, map[string]string{"range-global": "10.0.0.1-10.0.0.9"})
	// A claim whose Service write may still land: it must outlive the
	// grace. And a claim of a Service that carries it: it must stay.
	ctx := context.Background()
	leases := api.CoordinationV1().Leases(daemonNS)
	if _, err := leases.Create(ctx, newClaim(daemonNS, mustAddr("10.0.0.1"), "default", []string{"gone"}, time.Now()), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := leases.Create(ctx, newClaim(daemonNS, mustAddr("10.0.0.2"), "default", []string{"kept"}, time.Now()), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	api.create(t, lbService("default", "kept", annotated("10.0.0.2")))
	clk := clocktesting.NewFakeClock(time.Now())
	a := newAllocator(t, newTestClient(api, 0), &recorder{}, clk, nil)
	start(t, a)
	waitFor(t, "the GC timer", 5*time.Second, clk.HasWaiters)
	steps := 0
	for range int(DefaultClaimGrace/DefaultGCInterval) - 1 {
		waitFor(t, "the GC timer", 5*time.Second, clk.HasWaiters)
		clk.Step(DefaultGCInterval)
		steps++
	}
	// First seen orphaned at the first step: not yet ClaimGrace ago.
	if c := api.claimLeases(t); c["10.0.0.1"] == nil {
		t.Fatalf("claim freed after %d×%v, before its grace", steps, DefaultGCInterval)
	}
	waitFor(t, "the orphaned claim freed", 10*time.Second, func() bool {
		if api.claimLeases(t)["10.0.0.1"] == nil {
			return true
		}
		if clk.HasWaiters() {
			clk.Step(DefaultGCInterval)
		}
		return false
	})
	if api.claimLeases(t)["10.0.0.2"] == nil {
		t.Error("the claim of an address a Service carries was freed")
	}
}

func TestBadConfigValueIsReportedAndOtherPoolsWork(t *testing.T) {
	api := newFakeAPI()
	api.setConfig(t, map[string]string{
		"cidr-broken":  "10.1.0.300/24",
		"range-global": "10.0.0.1-10.0.0.9",
		"search-order": "sideways",
	})
	api.create(t, lbService("broken", "x"))
	api.create(t, lbService("fine", "y"))
	rec := &recorder{}
	a := newAllocator(t, newTestClient(api, 0), rec, clocktesting.NewFakeClock(time.Now()), nil)
	start(t, a)
	waitFor(t, "fine/y allocated", 10*time.Second, func() bool { return api.addresses(t)["fine/y"] == "10.0.0.1" })
	waitFor(t, "the Events", 5*time.Second, func() bool {
		return len(rec.matching("Warning kube-system/kubevip InvalidAddressPool", `cidr-broken: "10.1.0.300/24"`)) == 1 &&
			len(rec.matching("Warning kube-system/kubevip InvalidAddressPool", `search-order: "sideways"`)) == 1 &&
			len(rec.matching("Warning broken/x AllocationFailed", "cidr-broken")) == 1
	})
	if got := api.addresses(t)["broken/x"]; got != "" {
		t.Errorf("broken/x got %q from another pool", got)
	}
}

func TestLostServiceWriteUndoesTheClaim(t *testing.T) {
	api := newFakeAPI()
	api.setConfig(t, map[string]string{"range-global": "10.0.0.1-10.0.0.9"})
	api.create(t, lbService("default", "s"))
	fails := 1
	api.patchFails = func(_, _ string) error {
		if fails > 0 {
			fails--
			return apierrors.NewConflict(schema.GroupResource{Resource: "services"}, "s", nil)
		}
		return nil
	}
	clk := clocktesting.NewFakeClock(time.Now())
	a := newAllocator(t, newTestClient(api, 0), &recorder{}, clk, nil)
	start(t, a)
	waitFor(t, "s allocated", 10*time.Second, func() bool {
		if api.addresses(t)["default/s"] != "" {
			return true
		}
		if clk.HasWaiters() {
			clk.Step(time.Second)
		}
		return false
	})
	if c := api.claimLeases(t); len(c) != 1 {
		t.Errorf("%d claims after a lost write and a retry, want 1", len(c))
	}
}

func TestSharingStaysInANamespaceAndAvoidsPortClashes(t *testing.T) {
	api := newFakeAPI()
	api.setConfig(t, map[string]string{"range-global": "10.0.0.1-10.0.0.9", "allow-share-global": "true", "allow-share-solo": "false"})
	for _, s := range []*corev1.Service{
		lbService("a", "s1", ports(80)),
		lbService("a", "s2", ports(443)),
		lbService("a", "s3", ports(80, 8080)),
		lbService("b", "s4", ports(22)),
		lbService("solo", "s5", ports(53)),
		lbService("solo", "s6", ports(54)),
	} {
		api.create(t, s)
	}
	a := newAllocator(t, newTestClient(api, 0), &recorder{}, clocktesting.NewFakeClock(time.Now()), nil)
	start(t, a)
	waitFor(t, "every Service allocated", 10*time.Second, func() bool {
		for _, v := range api.addresses(t) {
			if v == "" {
				return false
			}
		}
		return true
	})
	got := api.addresses(t)
	want := map[string]string{"a/s1": "10.0.0.1", "a/s2": "10.0.0.1", "a/s3": "10.0.0.2", "b/s4": "10.0.0.3", "solo/s5": "10.0.0.4", "solo/s6": "10.0.0.5"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: got %q, want %q", k, got[k], v)
		}
	}
	if l := api.claimLeases(t)["10.0.0.1"]; l == nil || l.Annotations[AnnotationServices] != "s1,s2" {
		t.Errorf("claim of the shared address: %v", l)
	}
}

func TestParseConfigReportsEveryBadKey(t *testing.T) {
	_, errs := ParseConfig(map[string]string{
		"cidr-a": "10.0.0.0/33", "range-b": "10.0.0.9-10.0.0.1", "allow-share-c": "perhaps",
		"skip-end-ips-in-cidr": "yes", "cidr-global": "10.0.0.0/24",
	})
	var keys []string
	for _, e := range errs {
		keys = append(keys, e.Key)
		if !strings.Contains(e.Error(), e.Key+": "+`"`) {
			t.Errorf("error %q does not name key and value", e)
		}
	}
	if want := []string{"allow-share-c", "cidr-a", "range-b", "skip-end-ips-in-cidr"}; !slices.Equal(keys, want) {
		t.Errorf("bad keys %v, want %v", keys, want)
	}
}
