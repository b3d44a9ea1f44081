package node

import (
	"maps"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/tools/cache"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/kube"
)

const (
	byPodIP    = "byPodIP"
	byPodLabel = "byPodLabel"
)

// localPodInformer watches only this node's pods (a field selector, as the
// kubelet does): an endpoint is egressed only if its address is one of a
// pod on this node in the Service's namespace, which a hand-written
// EndpointSlice cannot fake; and a pod a Service selects egresses from its
// first packet, before any slice lists it.
func localPodInformer(client kube.Interface, namespace, node string) cache.SharedIndexInformer {
	return kube.NewInformer(client, client.Pods(namespace), &corev1.Pod{}, kube.InformerOptions{
		Indexers: cache.Indexers{byPodIP: indexByPodIP, byPodLabel: indexByPodLabel, cache.NamespaceIndex: cache.MetaNamespaceIndexFunc},
		Tweak: func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		},
		Transform: compactPod,
	})
}

// localPod is what the cache keeps of one of this node's pods: what the
// trust check and the selector match read. A corev1.Pod is 1.2 KB before
// any of its fields are set, and a node may run hundreds of pods.
type localPod struct {
	metav1.ObjectMeta // namespace, name, UID, labels, resourceVersion, deletion
	HostNetwork       bool
	// Done is true for a pod that ended (Succeeded, Failed): its address
	// may already be another pod's.
	Done bool
	IPs  []netip.Addr
}

func (p *localPod) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

func (p *localPod) DeepCopyObject() runtime.Object {
	c := *p
	p.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.IPs = slices.Clone(p.IPs)
	return &c
}

// compactPod is the pod informer's transform.
func compactPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &localPod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ResourceVersion: p.ResourceVersion,
			Labels: p.Labels, DeletionTimestamp: p.DeletionTimestamp},
		HostNetwork: p.Spec.HostNetwork,
		Done:        p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed,
	}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a.Unmap())
		}
	}
	return out, nil
}

func indexByPodIP(obj any) ([]string, error) {
	p, ok := obj.(*localPod)
	if !ok || p.Done {
		return nil, nil
	}
	out := make([]string, len(p.IPs))
	for i, a := range p.IPs {
		out[i] = a.String()
	}
	return out, nil
}

// indexByPodLabel indexes pods by "namespace/key=value" of each label: a
// Service's selector finds its pods without a scan of the namespace (each
// sync asks once per egress Service).
func indexByPodLabel(obj any) ([]string, error) {
	p, ok := obj.(*localPod)
	if !ok || p.Done {
		return nil, nil
	}
	out := make([]string, 0, len(p.Labels))
	for k, v := range p.Labels {
		out = append(out, p.Namespace+"/"+k+"="+v)
	}
	return out, nil
}

func refOf(p *localPod) desired.PodRef {
	return desired.PodRef{Namespace: p.Namespace, Name: p.Name, HostNetwork: p.HostNetwork,
		IPs: p.IPs, Terminating: p.DeletionTimestamp != nil}
}

// localPodByIP finds this node's running or pending pod with address a. An
// address two such pods claim is trusted for neither (Shared).
func (c *Controller) localPodByIP(a netip.Addr) (desired.PodRef, bool) {
	objs, err := c.pods.ByIndex(byPodIP, a.String())
	if err != nil || len(objs) == 0 {
		return desired.PodRef{}, false
	}
	p, ok := objs[0].(*localPod)
	if !ok {
		return desired.PodRef{}, false
	}
	ref := refOf(p)
	if len(objs) > 1 {
		ref.Shared = true
	}
	return ref, true
}

// localPodsSelected lists this node's running or pending pods of a
// namespace that a selector selects.
func (c *Controller) localPodsSelected(namespace string, sel labels.Selector) []desired.PodRef {
	// The pods with the selector's first label, when it requires one;
	// the selector then checks the rest.
	index, value := cache.NamespaceIndex, namespace
	if reqs, ok := sel.Requirements(); ok {
		for _, r := range reqs {
			if vs := r.ValuesUnsorted(); (r.Operator() == selection.Equals || r.Operator() == selection.DoubleEquals) && len(vs) == 1 {
				index, value = byPodLabel, namespace+"/"+r.Key()+"="+vs[0]
				break
			}
		}
	}
	objs, err := c.pods.ByIndex(index, value)
	if err != nil {
		return nil
	}
	var out []desired.PodRef
	for _, o := range objs {
		p, ok := o.(*localPod)
		if !ok || p.Done || !sel.Matches(labels.Set(p.Labels)) {
			continue
		}
		out = append(out, refOf(p))
	}
	return out
}

// knownPodIPs are the addresses of every running or pending pod of this
// node (the gate lets their traffic pass).
func (c *Controller) knownPodIPs() []netip.Addr {
	var out []netip.Addr
	for _, o := range c.pods.List() {
		if p, ok := o.(*localPod); ok && !p.Done && !p.HostNetwork {
			out = append(out, p.IPs...)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// podChanged pokes only when what egressvip reads of a pod changed: status
// updates of this node's pods are frequent.
func podChanged(oldObj, newObj any) bool {
	o, ok1 := oldObj.(*localPod)
	n, ok2 := newObj.(*localPod)
	return !ok1 || !ok2 || o.HostNetwork != n.HostNetwork || o.Done != n.Done || !slices.Equal(o.IPs, n.IPs) ||
		(o.DeletionTimestamp == nil) != (n.DeletionTimestamp == nil) || !maps.Equal(o.Labels, n.Labels)
}
