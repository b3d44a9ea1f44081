// Package kube is egressvip's Kubernetes client: the seven resources it
// reads or writes, on client-go's REST client and generic typed client
// (gentype), with a scheme of only the four API groups they belong to.
//
// client-go's clientset, its informer factory and their scheme link and
// register every API group at start: about 10 MiB of resident memory on
// every node for code egressvip never runs. The typed clients here are the
// ones the clientset would build (gentype, protobuf preferred), so their
// behaviour is client-go's; only the set of groups is smaller.
package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/gentype"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"
)

// Scheme knows the API groups egressvip uses, and no other.
var Scheme = runtime.NewScheme()

// Codecs encodes and decodes the objects of Scheme.
var Codecs = serializer.NewCodecFactory(Scheme)

var parameterCodec = runtime.NewParameterCodec(Scheme)

func init() {
	metav1.AddToGroupVersion(Scheme, schema.GroupVersion{Version: "v1"})
	utilruntime.Must(corev1.AddToScheme(Scheme))
	utilruntime.Must(discoveryv1.AddToScheme(Scheme))
	utilruntime.Must(coordinationv1.AddToScheme(Scheme))
	utilruntime.Must(networkingv1.AddToScheme(Scheme))
}

// ListWatcher lists and watches one resource; it is all an informer needs.
type ListWatcher[L runtime.Object] interface {
	List(ctx context.Context, opts metav1.ListOptions) (L, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}

// ServiceClient reads Services and patches their annotations and status.
type ServiceClient interface {
	ListWatcher[*corev1.ServiceList]
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Service, error)
}

// LeaseClient reads and writes Leases: heartbeats and Service Leases.
type LeaseClient interface {
	ListWatcher[*coordinationv1.LeaseList]
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*coordinationv1.Lease, error)
	Create(ctx context.Context, l *coordinationv1.Lease, opts metav1.CreateOptions) (*coordinationv1.Lease, error)
	Update(ctx context.Context, l *coordinationv1.Lease, opts metav1.UpdateOptions) (*coordinationv1.Lease, error)
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error
}

// PodClient lists, watches and reads pods: a node's own pods (endpoint
// trust), another node's pod behind a steered endpoint, kube-controller-
// manager's static pods (CIDR detection).
type PodClient interface {
	ListWatcher[*corev1.PodList]
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Pod, error)
}

// EventClient writes core/v1 Events, for client-go's event recorder.
type EventClient interface {
	Create(ctx context.Context, e *corev1.Event, opts metav1.CreateOptions) (*corev1.Event, error)
	Update(ctx context.Context, e *corev1.Event, opts metav1.UpdateOptions) (*corev1.Event, error)
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Event, error)
}

// Interface is what egressvip asks of the API server. Client implements it
// against a real one; kubefake adapts client-go's fake clientset for tests.
type Interface interface {
	Services(namespace string) ServiceClient
	EndpointSlices(namespace string) ListWatcher[*discoveryv1.EndpointSliceList]
	Pods(namespace string) PodClient
	Nodes() ListWatcher[*corev1.NodeList]
	ServiceCIDRs() ListWatcher[*networkingv1.ServiceCIDRList]
	Leases(namespace string) LeaseClient
	Events(namespace string) EventClient
	// ConfigMaps reads kube-vip-cloud-provider's pool ConfigMap (the
	// address allocator).
	ConfigMaps(namespace string) ListWatcher[*corev1.ConfigMapList]
	// ServerResources lists the resources of one group version, as
	// discovery does ("networking.k8s.io/v1", or "v1" for the core group).
	ServerResources(ctx context.Context, groupVersion string) (*metav1.APIResourceList, error)
}

// Client is Interface on a real API server: one REST client per API group,
// sharing one HTTP client and one rate limiter, as client-go's clientset
// does.
type Client struct {
	core, discovery, coordination, networking rest.Interface
}

var _ Interface = (*Client)(nil)

// New builds a Client from c; c.QPS and c.Burst bound all its requests
// together.
func New(c *rest.Config) (*Client, error) {
	cfg := *c
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	if cfg.RateLimiter == nil && cfg.QPS > 0 {
		if cfg.Burst <= 0 {
			return nil, fmt.Errorf("burst must be above 0 when QPS is set (QPS %v)", cfg.QPS)
		}
		cfg.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(cfg.QPS, cfg.Burst)
	}
	httpClient, err := rest.HTTPClientFor(&cfg)
	if err != nil {
		return nil, err
	}
	group := func(apiPath string, gv schema.GroupVersion) (rest.Interface, error) {
		g := cfg
		g.APIPath = apiPath
		g.GroupVersion = &gv
		g.NegotiatedSerializer = Codecs.WithoutConversion()
		return rest.RESTClientForConfigAndClient(&g, httpClient)
	}
	var out Client
	for _, g := range []struct {
		into    *rest.Interface
		apiPath string
		gv      schema.GroupVersion
	}{
		{&out.core, "/api", corev1.SchemeGroupVersion},
		{&out.discovery, "/apis", discoveryv1.SchemeGroupVersion},
		{&out.coordination, "/apis", coordinationv1.SchemeGroupVersion},
		{&out.networking, "/apis", networkingv1.SchemeGroupVersion},
	} {
		if *g.into, err = group(g.apiPath, g.gv); err != nil {
			return nil, fmt.Errorf("%s client: %w", g.gv, err)
		}
	}
	return &out, nil
}

// typed is client-go's generic typed client of one resource, as its
// clientset builds it for built-in types.
func typed[T interface {
	*E
	runtime.Object
	metav1.Object
}, L interface {
	*LE
	runtime.Object
}, E, LE any](resource string, c rest.Interface, namespace string) *gentype.ClientWithList[T, L] {
	return gentype.NewClientWithList[T, L](resource, c, parameterCodec, namespace,
		func() T { return T(new(E)) }, func() L { return L(new(LE)) }, gentype.PrefersProtobuf[T]())
}

func (c *Client) Services(namespace string) ServiceClient {
	return typed[*corev1.Service, *corev1.ServiceList]("services", c.core, namespace)
}

func (c *Client) EndpointSlices(namespace string) ListWatcher[*discoveryv1.EndpointSliceList] {
	return typed[*discoveryv1.EndpointSlice, *discoveryv1.EndpointSliceList]("endpointslices", c.discovery, namespace)
}

func (c *Client) Pods(namespace string) PodClient {
	return typed[*corev1.Pod, *corev1.PodList]("pods", c.core, namespace)
}

func (c *Client) Nodes() ListWatcher[*corev1.NodeList] {
	return typed[*corev1.Node, *corev1.NodeList]("nodes", c.core, "")
}

func (c *Client) ServiceCIDRs() ListWatcher[*networkingv1.ServiceCIDRList] {
	return typed[*networkingv1.ServiceCIDR, *networkingv1.ServiceCIDRList]("servicecidrs", c.networking, "")
}

func (c *Client) Leases(namespace string) LeaseClient {
	return typed[*coordinationv1.Lease, *coordinationv1.LeaseList]("leases", c.coordination, namespace)
}

func (c *Client) ConfigMaps(namespace string) ListWatcher[*corev1.ConfigMapList] {
	return typed[*corev1.ConfigMap, *corev1.ConfigMapList]("configmaps", c.core, namespace)
}

func (c *Client) Events(namespace string) EventClient {
	return typed[*corev1.Event, *corev1.EventList]("events", c.core, namespace)
}

// ServerResources asks discovery for one group version's resources.
func (c *Client) ServerResources(ctx context.Context, groupVersion string) (*metav1.APIResourceList, error) {
	path := "/apis/" + groupVersion
	if !strings.Contains(groupVersion, "/") {
		path = "/api/" + groupVersion
	}
	raw, err := c.core.Get().AbsPath(path).SetHeader("Accept", "application/json").Do(ctx).Raw()
	if err != nil {
		return nil, err
	}
	var list metav1.APIResourceList
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("discovery of %s: %w", groupVersion, err)
	}
	return &list, nil
}

// Served tells whether the API server serves resource in groupVersion; an
// error counts as not served.
func Served(ctx context.Context, client Interface, groupVersion, resource string) bool {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	list, err := client.ServerResources(ctx, groupVersion)
	if err != nil {
		return false
	}
	for _, r := range list.APIResources {
		if r.Name == resource {
			return true
		}
	}
	return false
}

// InformerOptions shape one informer.
type InformerOptions struct {
	Resync   time.Duration
	Indexers cache.Indexers
	// Tweak changes every list and watch request (selectors).
	Tweak func(*metav1.ListOptions)
	// Transform slims objects before they are cached.
	Transform cache.TransformFunc
}

// NewInformer is a shared informer of the objects lw lists, as client-go's
// generated informers build it; client tells the reflector whether it may
// use watch-list streaming (client-go's fake clientset may not).
func NewInformer[L runtime.Object](client Interface, lw ListWatcher[L], example runtime.Object, o InformerOptions) cache.SharedIndexInformer {
	tweak := func(opts *metav1.ListOptions) {
		if o.Tweak != nil {
			o.Tweak(opts)
		}
	}
	inf := cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			tweak(&opts)
			return lw.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			tweak(&opts)
			return lw.Watch(ctx, opts)
		},
	}, client), example, o.Resync, o.Indexers)
	if o.Transform != nil {
		// Only fails once the informer has started.
		_ = inf.SetTransform(o.Transform)
	}
	return inf
}

// EventSink hands client-go's event broadcaster's writes to client, in the
// namespace of each Event (what client-go's EventSinkImpl does for its
// clientset).
type EventSink struct {
	Client Interface
	// Timeout bounds each write; 0 means 30 s.
	Timeout time.Duration
}

func (s *EventSink) ctx() (context.Context, context.CancelFunc) {
	t := s.Timeout
	if t <= 0 {
		t = 30 * time.Second
	}
	return context.WithTimeout(context.Background(), t)
}

func (s *EventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	return s.Client.Events(e.Namespace).Create(ctx, e, metav1.CreateOptions{})
}

func (s *EventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	return s.Client.Events(e.Namespace).Update(ctx, e, metav1.UpdateOptions{})
}

func (s *EventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	return s.Client.Events(e.Namespace).Patch(ctx, e.Name, types.StrategicMergePatchType, data, metav1.PatchOptions{})
}
