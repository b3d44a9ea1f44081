// Package kubefake adapts client-go's fake clientset to kube.Interface, for
// unit tests. Only tests import it: it links client-go's full clientset.
package kubefake

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/watchlist"

	"github.com/egressvip/egressvip/pkg/kube"
)

// Wrap serves kube.Interface from cs.
func Wrap(cs kubernetes.Interface) kube.Interface { return &client{cs} }

type client struct{ cs kubernetes.Interface }

// IsWatchListSemanticsUnSupported passes on whether cs can stream lists
// (client-go's fake clientset cannot), for the informers' reflectors.
func (c *client) IsWatchListSemanticsUnSupported() bool {
	return watchlist.DoesClientNotSupportWatchListSemantics(c.cs)
}

func (c *client) Services(ns string) kube.ServiceClient { return c.cs.CoreV1().Services(ns) }

func (c *client) EndpointSlices(ns string) kube.ListWatcher[*discoveryv1.EndpointSliceList] {
	return c.cs.DiscoveryV1().EndpointSlices(ns)
}

func (c *client) Pods(ns string) kube.PodClient { return c.cs.CoreV1().Pods(ns) }

func (c *client) Nodes() kube.ListWatcher[*corev1.NodeList] { return c.cs.CoreV1().Nodes() }

func (c *client) ServiceCIDRs() kube.ListWatcher[*networkingv1.ServiceCIDRList] {
	return c.cs.NetworkingV1().ServiceCIDRs()
}

func (c *client) Leases(ns string) kube.LeaseClient { return c.cs.CoordinationV1().Leases(ns) }

func (c *client) Events(ns string) kube.EventClient { return c.cs.CoreV1().Events(ns) }

func (c *client) ConfigMaps(ns string) kube.ListWatcher[*corev1.ConfigMapList] {
	return c.cs.CoreV1().ConfigMaps(ns)
}

func (c *client) ServerResources(_ context.Context, gv string) (*metav1.APIResourceList, error) {
	return c.cs.Discovery().ServerResourcesForGroupVersion(gv)
}
