package node

import (
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/egressvip/egressvip/pkg/desired"
)

const byPodIP = "byPodIP"

// localPodInformer watches only this node's pods (a field selector, as the
// kubelet does): an endpoint is egressed only if its address is one of a
// pod on this node in the Service's namespace, which a hand-written
// EndpointSlice cannot fake.
func localPodInformer(client kubernetes.Interface, namespace, node string, resync time.Duration) cache.SharedIndexInformer {
	return coreinformers.NewFilteredPodInformer(client, namespace, resync,
		cache.Indexers{byPodIP: indexByPodIP},
		func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		})
}

func indexByPodIP(obj any) ([]string, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return nil, nil
	}
	var out []string
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap().String())
		}
	}
	return out, nil
}

// slimPod keeps of a Pod what the trust check reads.
func slimPod(p *corev1.Pod) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork},
		Status:     corev1.PodStatus{PodIPs: p.Status.PodIPs, PodIP: p.Status.PodIP},
	}
}

// localPod finds this node's pod with address a.
func (c *Controller) localPod(a netip.Addr) (desired.PodRef, bool) {
	objs, err := c.pods.ByIndex(byPodIP, a.String())
	if err != nil || len(objs) == 0 {
		return desired.PodRef{}, false
	}
	p, ok := objs[0].(*corev1.Pod)
	if !ok {
		return desired.PodRef{}, false
	}
	return desired.PodRef{Namespace: p.Namespace, Name: p.Name, HostNetwork: p.Spec.HostNetwork}, true
}

// podAddressesChanged pokes only when a pod's addresses or network mode
// changed: status updates of this node's pods are frequent.
func podAddressesChanged(oldObj, newObj any) bool {
	o, ok1 := oldObj.(*corev1.Pod)
	n, ok2 := newObj.(*corev1.Pod)
	if !ok1 || !ok2 || o.Spec.HostNetwork != n.Spec.HostNetwork || len(o.Status.PodIPs) != len(n.Status.PodIPs) {
		return true
	}
	for i := range o.Status.PodIPs {
		if o.Status.PodIPs[i] != n.Status.PodIPs[i] {
			return true
		}
	}
	return false
}
