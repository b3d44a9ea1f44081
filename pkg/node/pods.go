package node

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/kube"
)

const byPodIP = "byPodIP"

// localPodInformer watches only this node's pods (a field selector, as the
// kubelet does): an endpoint is egressed only if its address is one of a
// pod on this node in the Service's namespace, which a hand-written
// EndpointSlice cannot fake.
func localPodInformer(client kube.Interface, namespace, node string) cache.SharedIndexInformer {
	return kube.NewInformer(client, client.Pods(namespace), &corev1.Pod{}, kube.InformerOptions{
		Indexers: cache.Indexers{byPodIP: indexByPodIP},
		Tweak: func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		},
		Transform: compactPod,
	})
}

// localPodAddrs is what the cache keeps of one of this node's pods: what
// the trust check reads. A corev1.Pod is 1.2 KB before any of its fields
// are set, and a node may run hundreds of pods.
type localPodAddrs struct {
	metav1.ObjectMeta // namespace, name, UID and resourceVersion only
	HostNetwork       bool
	IPs               []netip.Addr
}

func (p *localPodAddrs) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

func (p *localPodAddrs) DeepCopyObject() runtime.Object {
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
	out := &localPodAddrs{
		ObjectMeta:  metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ResourceVersion: p.ResourceVersion},
		HostNetwork: p.Spec.HostNetwork,
	}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a.Unmap())
		}
	}
	return out, nil
}

func indexByPodIP(obj any) ([]string, error) {
	p, ok := obj.(*localPodAddrs)
	if !ok {
		return nil, nil
	}
	out := make([]string, len(p.IPs))
	for i, a := range p.IPs {
		out[i] = a.String()
	}
	return out, nil
}

// localPod finds this node's pod with address a.
func (c *Controller) localPod(a netip.Addr) (desired.PodRef, bool) {
	objs, err := c.pods.ByIndex(byPodIP, a.String())
	if err != nil || len(objs) == 0 {
		return desired.PodRef{}, false
	}
	p, ok := objs[0].(*localPodAddrs)
	if !ok {
		return desired.PodRef{}, false
	}
	return desired.PodRef{Namespace: p.Namespace, Name: p.Name, HostNetwork: p.HostNetwork}, true
}

// podAddressesChanged pokes only when a pod's addresses or network mode
// changed: status updates of this node's pods are frequent.
func podAddressesChanged(oldObj, newObj any) bool {
	o, ok1 := oldObj.(*localPodAddrs)
	n, ok2 := newObj.(*localPodAddrs)
	return !ok1 || !ok2 || o.HostNetwork != n.HostNetwork || !slices.Equal(o.IPs, n.IPs)
}
