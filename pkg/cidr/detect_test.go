package cidr

import (
	"context"
	"io"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/egressvip/egressvip/pkg/kube/kubefake"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func node(name string, cidrs ...string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
}

func serviceCIDR(name string, deleting bool, cidrs ...string) *networkingv1.ServiceCIDR {
	sc := &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: cidrs}}
	if deleting {
		now := metav1.Now()
		sc.DeletionTimestamp = &now
	}
	return sc
}

func kcmPod(command []string, args ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kube-controller-manager-cp1", Labels: map[string]string{"component": "kube-controller-manager"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "kcm", Command: command, Args: args}}},
	}
}

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		in                     Inputs
		wantPod, wantSvc       []netip.Prefix
		wantPodSrc, wantSvcSrc string
		wantWarnings           int
	}{
		{name: "nothing known: defaults with warnings", wantPod: prefixes("10.0.0.0/16"), wantSvc: prefixes("10.96.0.0/12"),
			wantPodSrc: SourceDefault, wantSvcSrc: SourceDefault, wantWarnings: 2},
		{name: "cluster objects, dual-stack, aggregated",
			in: Inputs{
				Nodes:        []*corev1.Node{node("b", "10.244.2.0/24", "fd00:10:244:2::/64"), node("a", "10.244.1.0/24", "fd00:10:244:1::/64"), node("c", "10.244.1.0/24")},
				ServiceCIDRs: []*networkingv1.ServiceCIDR{serviceCIDR("kubernetes", false, "10.96.0.0/16", "fd00:10:96::/112"), serviceCIDR("extra", false, "10.96.1.0/24")},
			},
			wantPod:    prefixes("10.244.1.0/24", "10.244.2.0/24", "fd00:10:244:1::/64", "fd00:10:244:2::/64"),
			wantSvc:    prefixes("10.96.0.0/16", "fd00:10:96::/112"),
			wantPodSrc: SourceNodes, wantSvcSrc: SourceObjects},
		{name: "deleting ServiceCIDR ignored, kcm flags next",
			in: Inputs{
				ServiceCIDRs: []*networkingv1.ServiceCIDR{serviceCIDR("old", true, "10.200.0.0/16")},
				KCMPods:      []*corev1.Pod{kcmPod([]string{"kube-controller-manager", "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56", "--service-cluster-ip-range", "10.96.0.0/12"})},
			},
			wantPod:    prefixes("10.244.0.0/16", "fd00:10:244::/56"),
			wantSvc:    prefixes("10.96.0.0/12"),
			wantPodSrc: SourceKCM, wantSvcSrc: SourceKCM},
		{name: "kcm flags in args",
			in:      Inputs{KCMPods: []*corev1.Pod{kcmPod(nil, "--cluster-cidr", "192.168.0.0/16", "--service-cluster-ip-range=172.20.0.0/16")}},
			wantPod: prefixes("192.168.0.0/16"), wantSvc: prefixes("172.20.0.0/16"), wantPodSrc: SourceKCM, wantSvcSrc: SourceKCM},
		{name: "override wins per kind",
			in: Inputs{
				Override: Override{Pod: prefixes("10.1.0.0/16")},
				Nodes:    []*corev1.Node{node("a", "10.244.1.0/24")},
				KCMPods:  []*corev1.Pod{kcmPod(nil, "--service-cluster-ip-range=172.20.0.0/16")},
			},
			wantPod: prefixes("10.1.0.0/16"), wantSvc: prefixes("172.20.0.0/16"), wantPodSrc: SourceOverride, wantSvcSrc: SourceKCM},
		{name: "an IPv4-only override keeps the detected IPv6 range",
			in: Inputs{
				Override: Override{Pod: prefixes("10.244.0.0/16")},
				Nodes:    []*corev1.Node{node("a", "10.244.1.0/24", "fd00:10:244:1::/64")},
				KCMPods:  []*corev1.Pod{kcmPod(nil, "--service-cluster-ip-range=10.96.0.0/12,fd00:10:96::/112")},
			},
			wantPod:    prefixes("10.244.0.0/16", "fd00:10:244:1::/64"),
			wantSvc:    prefixes("10.96.0.0/12", "fd00:10:96::/112"),
			wantPodSrc: SourceOverride + "," + SourceNodes, wantSvcSrc: SourceKCM},
		{name: "nodes with IPv4 ranges only: IPv6 from kube-controller-manager",
			in: Inputs{
				Nodes:   []*corev1.Node{node("a", "10.244.1.0/24")},
				KCMPods: []*corev1.Pod{kcmPod(nil, "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56", "--service-cluster-ip-range=10.96.0.0/12")},
			},
			wantPod:    prefixes("10.244.1.0/24", "fd00:10:244::/56"),
			wantSvc:    prefixes("10.96.0.0/12"),
			wantPodSrc: SourceNodes + "," + SourceKCM, wantSvcSrc: SourceKCM},
		{name: "only pods unknown: one warning",
			in:      Inputs{Override: Override{Service: prefixes("10.96.0.0/12")}},
			wantPod: prefixes("10.0.0.0/16"), wantSvc: prefixes("10.96.0.0/12"), wantPodSrc: SourceDefault, wantSvcSrc: SourceOverride, wantWarnings: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Detect(tc.in)
			if !slices.Equal(r.Pod, tc.wantPod) || r.PodSource != tc.wantPodSrc {
				t.Errorf("pod %v (%s), want %v (%s)", r.Pod, r.PodSource, tc.wantPod, tc.wantPodSrc)
			}
			if !slices.Equal(r.Service, tc.wantSvc) || r.ServiceSource != tc.wantSvcSrc {
				t.Errorf("service %v (%s), want %v (%s)", r.Service, r.ServiceSource, tc.wantSvc, tc.wantSvcSrc)
			}
			if len(r.Warnings) != tc.wantWarnings {
				t.Errorf("warnings %v, want %d", r.Warnings, tc.wantWarnings)
			}
		})
	}
}

func TestMissingPerFamily(t *testing.T) {
	r := Detect(Inputs{Override: Override{Pod: prefixes("10.244.0.0/16"), Service: prefixes("10.96.0.0/12", "fd00:10:96::/112")}})
	if m := r.Missing(true); !slices.Equal(m, []string{"pod"}) {
		t.Fatalf("IPv6 missing %v, want [pod]", m)
	}
	if m := r.Missing(false); len(m) != 0 {
		t.Fatalf("IPv4 missing %v", m)
	}
}

func TestExcludeIsSortedUnion(t *testing.T) {
	r := Result{Pod: prefixes("10.244.0.0/16", "fd00:10:244::/56"), Service: prefixes("10.96.0.0/12", "10.244.5.0/24")}
	want := prefixes("10.96.0.0/12", "10.244.0.0/16", "fd00:10:244::/56")
	if got := r.Exclude(); !slices.Equal(got, want) {
		t.Fatalf("Exclude = %v, want %v", got, want)
	}
}

func TestDetectorFollowsNodes(t *testing.T) {
	big := node("a", "10.244.1.0/24")
	big.Labels = map[string]string{"kubernetes.io/hostname": "a"}
	big.Status.Images = []corev1.ContainerImage{{Names: []string{"registry.example/app:v1"}, SizeBytes: 1 << 30}}
	client := fake.NewClientset(big)
	log := logrus.New()
	log.SetOutput(io.Discard)
	changed := make(chan struct{}, 10)
	d := NewDetector(kubefake.Wrap(client), Override{}, 0, func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}, logrus.NewEntry(log))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d.Start(ctx.Done())
	deadline := time.Now().Add(10 * time.Second)
	for !d.HasSynced() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := d.Current().Pod; !slices.Equal(got, prefixes("10.244.1.0/24")) {
		t.Fatalf("pod CIDRs %v", got)
	}
	// The cache holds only what detection reads.
	if cached, err := d.nodes.Get("a"); err != nil || len(cached.Status.Images) != 0 || len(cached.Labels) != 0 {
		t.Fatalf("cached Node is not slimmed: %+v (%v)", cached, err)
	}
	if _, err := client.CoreV1().Nodes().Create(ctx, node("b", "10.244.2.0/24"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := prefixes("10.244.1.0/24", "10.244.2.0/24")
	for !slices.Equal(d.Current().Pod, want) {
		if time.Now().After(deadline) {
			t.Fatalf("pod CIDRs %v, want %v", d.Current().Pod, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-changed:
	default:
		t.Fatal("a new Node did not poke the sync loop")
	}
}

func TestDetectNodeAddresses(t *testing.T) {
	n := node("a", "10.244.1.0/24")
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "198.51.100.11"}, {Type: corev1.NodeHostName, Address: "a"}}
	r := Detect(Inputs{Nodes: []*corev1.Node{n}})
	if len(r.NodeAddresses) != 1 || !r.NodeAddresses[netip.MustParseAddr("198.51.100.11")] {
		t.Fatalf("NodeAddresses %v, want only 198.51.100.11", r.NodeAddresses)
	}
}
