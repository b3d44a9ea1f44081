// Package cidr finds the pod and Service CIDRs that egress SNAT must leave
// alone. Detect is pure; Detector feeds it from informer caches.
package cidr

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// Sources of a detected range, in the order they are tried.
const (
	SourceOverride   = "override"
	SourceObjects    = "servicecidr-objects"
	SourceNodes      = "node-podcidrs"
	SourceKCM        = "kube-controller-manager"
	SourceDefault    = "default"
	clusterCIDRFlag  = "--cluster-cidr"
	serviceRangeFlag = "--service-cluster-ip-range"
)

// Defaults used when nothing else is known (kube-vip's).
var (
	DefaultPodCIDR     = netip.MustParsePrefix("10.0.0.0/16")
	DefaultServiceCIDR = netip.MustParsePrefix("10.96.0.0/12")
)

// Override holds egress_podcidr and egress_servicecidr; each wins for its
// kind when non-empty.
type Override struct {
	Pod     []netip.Prefix
	Service []netip.Prefix
}

// Inputs is everything Detect looks at.
type Inputs struct {
	Override     Override
	ServiceCIDRs []*networkingv1.ServiceCIDR
	Nodes        []*corev1.Node
	// KCMPods are kube-controller-manager's static pods (kube-system,
	// component=kube-controller-manager).
	KCMPods []*corev1.Pod
}

// Result is the detected ranges with where they came from.
type Result struct {
	Pod           []netip.Prefix
	Service       []netip.Prefix
	PodSource     string
	ServiceSource string
	Warnings      []string
	// NodeAddresses are every Node's IP addresses (status.addresses).
	NodeAddresses map[netip.Addr]bool
}

// Exclude is every pod and Service range, sorted.
func (r Result) Exclude() []netip.Prefix {
	return aggregate(append(slices.Clone(r.Pod), r.Service...))
}

// Detect picks, per kind: the override, else the cluster objects
// (ServiceCIDR objects for Services, every Node's spec.podCIDRs for pods),
// else kube-controller-manager's flags, else the IPv4 default with a
// warning.
func Detect(in Inputs) Result {
	var r Result
	var svcObjs, podObjs []netip.Prefix
	for _, sc := range in.ServiceCIDRs {
		if sc.DeletionTimestamp != nil {
			continue
		}
		svcObjs = append(svcObjs, parseAll(sc.Spec.CIDRs)...)
	}
	r.NodeAddresses = map[netip.Addr]bool{}
	for _, n := range in.Nodes {
		for _, a := range n.Status.Addresses {
			if ip, err := netip.ParseAddr(a.Address); err == nil {
				r.NodeAddresses[ip.Unmap()] = true
			}
		}
		cidrs := n.Spec.PodCIDRs
		if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
			cidrs = []string{n.Spec.PodCIDR}
		}
		podObjs = append(podObjs, parseAll(cidrs)...)
	}
	var kcmPod, kcmSvc []netip.Prefix
	for _, p := range in.KCMPods {
		kcmPod = append(kcmPod, parseAll(flagValues(p, clusterCIDRFlag))...)
		kcmSvc = append(kcmSvc, parseAll(flagValues(p, serviceRangeFlag))...)
	}

	// Each kind and family is picked on its own: an IPv4-only override
	// must not drop the detected IPv6 range, and nodes with IPv4 pod
	// ranges only must not hide kube-controller-manager's IPv6 one.
	var podSources, svcSources []string
	for _, v6 := range []bool{false, true} {
		def := []netip.Prefix{DefaultPodCIDR}
		defSvc := []netip.Prefix{DefaultServiceCIDR}
		if v6 {
			def, defSvc = nil, nil
		}
		pod, src := pick(
			candidate{SourceOverride, family(in.Override.Pod, v6)},
			candidate{SourceNodes, family(podObjs, v6)},
			candidate{SourceKCM, family(kcmPod, v6)},
			candidate{SourceDefault, def})
		if src != "" {
			r.Pod = append(r.Pod, pod...)
			podSources = append(podSources, src)
		}
		svc, src := pick(
			candidate{SourceOverride, family(in.Override.Service, v6)},
			candidate{SourceObjects, family(svcObjs, v6)},
			candidate{SourceKCM, family(kcmSvc, v6)},
			candidate{SourceDefault, defSvc})
		if src != "" {
			r.Service = append(r.Service, svc...)
			svcSources = append(svcSources, src)
		}
	}
	r.PodSource = strings.Join(slices.Compact(podSources), ",")
	r.ServiceSource = strings.Join(slices.Compact(svcSources), ",")
	if slices.Contains(podSources, SourceDefault) {
		r.Warnings = append(r.Warnings, fmt.Sprintf("could not detect the pod CIDR; using default %s; set egress_podcidr", DefaultPodCIDR))
	}
	if slices.Contains(svcSources, SourceDefault) {
		r.Warnings = append(r.Warnings, fmt.Sprintf("could not detect the Service CIDR; using default %s; set egress_servicecidr", DefaultServiceCIDR))
	}
	return r
}

// family keeps the IPv6 (v6) or IPv4 prefixes.
func family(ps []netip.Prefix, v6 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is6() == v6 {
			out = append(out, p)
		}
	}
	return out
}

// Missing names the exclusions a family lacks ("pod", "Service"): egress
// of that family would SNAT traffic to pods or Services.
func (r Result) Missing(v6 bool) []string {
	var out []string
	if len(family(r.Pod, v6)) == 0 {
		out = append(out, "pod")
	}
	if len(family(r.Service, v6)) == 0 {
		out = append(out, "Service")
	}
	return out
}

type candidate struct {
	source string
	cidrs  []netip.Prefix
}

func pick(cs ...candidate) ([]netip.Prefix, string) {
	for _, c := range cs {
		if len(c.cidrs) > 0 {
			return aggregate(c.cidrs), c.source
		}
	}
	return nil, ""
}

func parseAll(values []string) []netip.Prefix {
	var out []netip.Prefix
	for _, v := range values {
		for _, item := range strings.Split(v, ",") {
			if p, err := netip.ParsePrefix(strings.TrimSpace(item)); err == nil {
				out = append(out, p.Masked())
			}
		}
	}
	return out
}

// aggregate sorts, removes duplicates and drops prefixes contained in
// another one.
func aggregate(in []netip.Prefix) []netip.Prefix {
	ps := slices.Clone(in)
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	var out []netip.Prefix
	for _, p := range ps {
		if len(out) > 0 {
			last := out[len(out)-1]
			if last.Bits() <= p.Bits() && last.Contains(p.Addr()) {
				continue
			}
		}
		out = append(out, p)
	}
	return out
}

// flagValues returns the values of a flag in a pod's command and args, in
// both "--flag=value" and "--flag value" forms.
func flagValues(p *corev1.Pod, flag string) []string {
	var out []string
	for _, c := range p.Spec.Containers {
		words := append(slices.Clone(c.Command), c.Args...)
		for i, w := range words {
			switch {
			case strings.HasPrefix(w, flag+"="):
				out = append(out, strings.TrimPrefix(w, flag+"="))
			case w == flag && i+1 < len(words):
				out = append(out, words[i+1])
			}
		}
	}
	return out
}
