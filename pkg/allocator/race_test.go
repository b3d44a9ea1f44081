package allocator

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
)

// TestTwoAllocatorsNeverHandOutAnAddressTwice runs two allocators against
// one API server, each with caches that lag up to maxLag behind it, the
// way an old leader still runs for a moment after a new one started; here
// they overlap for the whole allocation, then the first stops. Services
// keep arriving in four namespaces. The pool is smaller than the number
// of Services, so both keep reaching for the same last addresses.
func TestTwoAllocatorsNeverHandOutAnAddressTwice(t *testing.T) {
	for _, tc := range []struct {
		name     string
		services int
		pool     string
		size     int
		share    bool
	}{
		{name: "room for all", services: 160, pool: "10.0.1.1-10.0.1.160", size: 160},
		{name: "pool smaller than demand", services: 160, pool: "10.0.1.1-10.0.1.120", size: 120},
		{name: "sharing in a namespace", services: 160, pool: "10.0.1.1-10.0.1.120", size: 120, share: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const maxLag = 30 * time.Millisecond
			api := newFakeAPI()
			cfg := map[string]string{"range-global": tc.pool}
			if tc.share {
				cfg["allow-share-global"] = "true"
			}
			api.setConfig(t, cfg)
			recA, recB := &recorder{}, &recorder{}
			a := newAllocator(t, newTestClient(api, maxLag), recA, clock.RealClock{}, nil)
			b := newAllocator(t, newTestClient(api, maxLag), recB, clock.RealClock{}, nil)
			stopA := start(t, a)

			create := func(from, to int) {
				var wg sync.WaitGroup
				for i := from; i < to; i++ {
					wg.Go(func() {
						ns := fmt.Sprintf("ns%d", i%4)
						// With sharing: every third Service clashes on
						// port 80, the others have a port of their own.
						p := int32(1000 + i)
						if i%3 == 0 {
							p = 80
						}
						svc := lbService(ns, fmt.Sprintf("s%d", i), ports(p))
						if _, err := api.CoreV1().Services(ns).Create(t.Context(), svc, metav1.CreateOptions{}); err != nil {
							t.Error(err)
						}
					})
				}
				wg.Wait()
			}
			create(0, tc.services/2)
			start(t, b)
			create(tc.services/2, tc.services)
			// The old leader goes once both have been at work.
			waitFor(t, "a third allocated", 20*time.Second, func() bool { return allocated(api.addresses(t)) >= tc.services/3 })
			stopA()

			want := min(tc.services, tc.size)
			if tc.share {
				want = -1
			}
			defer func() {
				if t.Failed() {
					t.Logf("allocated %d of %d Services, %d claims", allocated(api.addresses(t)), tc.services, len(api.claimLeases(t)))
				}
			}()
			waitFor(t, "allocation to settle", 60*time.Second, func() bool {
				n := allocated(api.addresses(t))
				if want >= 0 {
					return n == want
				}
				// With sharing every Service gets an address (the
				// pool is large enough for the clashing third).
				return n == tc.services
			})
			got := api.addresses(t)
			checkNoDoubleAllocation(t, api, got, tc.share)
			if !tc.share && tc.services > tc.size {
				// The rest were told, once each (by whichever allocator saw it).
				for name, v := range got {
					if v != "" {
						continue
					}
					ns, n, _ := strings.Cut(name, "/")
					if len(recA.matching("Warning "+ns+"/"+n+" AllocationFailed"))+len(recB.matching("Warning "+ns+"/"+n+" AllocationFailed")) == 0 {
						t.Errorf("%s got no address and no AllocationFailed Event", name)
					}
				}
			}
			// Claims: exactly one per address, naming its namespace.
			claims := api.claimLeases(t)
			for name, v := range got {
				ns, _, _ := strings.Cut(name, "/")
				for _, s := range strings.Split(v, ",") {
					if s == "" {
						continue
					}
					l := claims[s]
					if l == nil || *l.Spec.HolderIdentity != ns {
						t.Errorf("%s carries %s, whose claim is %v", name, s, l)
					}
				}
			}
		})
	}
}

func allocated(got map[string]string) int {
	n := 0
	for _, v := range got {
		if v != "" {
			n++
		}
	}
	return n
}

// checkNoDoubleAllocation: no address on Services of two namespaces; without
// sharing on no two Services; with it, never with a port number in common.
func checkNoDoubleAllocation(t *testing.T, api *fakeAPI, got map[string]string, share bool) {
	t.Helper()
	list, err := api.CoreV1().Services("").List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	byAddr := map[netip.Addr][]*corev1.Service{}
	for i := range list.Items {
		svc := &list.Items[i]
		for _, s := range strings.Split(got[svc.Namespace+"/"+svc.Name], ",") {
			if s != "" {
				byAddr[mustAddr(s)] = append(byAddr[mustAddr(s)], svc)
			}
		}
	}
	for a, svcs := range byAddr {
		if len(svcs) < 2 {
			continue
		}
		if !share {
			t.Errorf("%s handed out %d times", a, len(svcs))
			continue
		}
		var seen []int32
		for _, s := range svcs {
			if s.Namespace != svcs[0].Namespace {
				t.Errorf("%s handed to namespaces %s and %s", a, svcs[0].Namespace, s.Namespace)
			}
			for _, p := range s.Spec.Ports {
				if slices.Contains(seen, p.Port) {
					t.Errorf("%s shared by Services with port %d in common", a, p.Port)
				}
				seen = append(seen, p.Port)
			}
		}
	}
}
