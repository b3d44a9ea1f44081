package cidr

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/egressvip/egressvip/pkg/kube"
)

// KCMSelector finds kube-controller-manager's static pods in kube-system.
const KCMSelector = "component=kube-controller-manager"

// Detector keeps Detect's inputs in informer caches, so Current costs no
// API call. Nodes are watched only for their pod ranges and addresses.
type Detector struct {
	override Override
	log      *logrus.Entry

	informers  []cache.SharedIndexInformer
	nodes      corelisters.NodeLister
	cidrs      networkinglisters.ServiceCIDRLister
	kcm        corelisters.PodLister
	synced     []cache.InformerSynced
	lastWarned string

	// cached is the last Detect result; changed marks it stale. Every
	// sync asks several times, the inputs rarely change.
	mu      sync.Mutex
	cached  *Result
	changed atomic.Bool
}

// NewDetector builds a Detector; onChange is called when an input changes.
// Kinds fully given by override are not watched at all.
func NewDetector(client kube.Interface, override Override, resync time.Duration, onChange func(), log *logrus.Entry) *Detector {
	d := &Detector{override: override, log: log}
	inner := onChange
	onChange = func() {
		d.changed.Store(true)
		inner()
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { onChange() },
		UpdateFunc: func(oldObj, newObj any) { onChange() },
		DeleteFunc: func(any) { onChange() },
	}
	needPods, needServices := len(override.Pod) == 0, len(override.Service) == 0
	// Nodes are always watched: their addresses are never admitted as
	// LoadBalancer IPs nor egressed; their pod ranges are detected unless
	// overridden.
	nodes := kube.NewInformer(client, client.Nodes(), &corev1.Node{}, kube.InformerOptions{Resync: resync, Transform: slimNode})
	d.informers = append(d.informers, nodes)
	_, _ = nodes.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc:    func(any, bool) { onChange() },
		UpdateFunc: func(oldObj, newObj any) { nodeChanged(oldObj, newObj, onChange) },
		DeleteFunc: func(any) { onChange() },
	})
	d.nodes = corelisters.NewNodeLister(nodes.GetIndexer())
	d.synced = append(d.synced, nodes.HasSynced)
	if !needPods && !needServices {
		return d
	}
	if needServices {
		if kube.Served(context.Background(), client, "networking.k8s.io/v1", "servicecidrs") {
			inf := kube.NewInformer(client, client.ServiceCIDRs(), &networkingv1.ServiceCIDR{}, kube.InformerOptions{Resync: resync})
			d.informers = append(d.informers, inf)
			_, _ = inf.AddEventHandler(handler)
			d.cidrs = networkinglisters.NewServiceCIDRLister(inf.GetIndexer())
			d.synced = append(d.synced, inf.HasSynced)
		} else {
			log.Warn("the ServiceCIDR API (networking.k8s.io/v1) is not served; Service CIDR detection falls back to kube-controller-manager's flags")
		}
	}
	kcm := kube.NewInformer(client, client.Pods(metav1.NamespaceSystem), &corev1.Pod{}, kube.InformerOptions{
		Resync:   resync,
		Indexers: cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc},
		Tweak:    func(o *metav1.ListOptions) { o.LabelSelector = KCMSelector },
	})
	d.informers = append(d.informers, kcm)
	_, _ = kcm.AddEventHandler(handler)
	d.kcm = corelisters.NewPodLister(kcm.GetIndexer())
	d.synced = append(d.synced, kcm.HasSynced)
	return d
}

// slimNode keeps of a Node only what is read, its name, pod ranges and
// addresses: a cache of every Node of the cluster, with their status, images
// and conditions, would otherwise sit in the egressvip process of every
// node. Other objects pass unchanged.
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion},
		Spec:       corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
		Status:     corev1.NodeStatus{Addresses: ipAddresses(n.Status.Addresses)},
	}, nil
}

// ipAddresses keeps the addresses of a Node that are IPs (not host names).
func ipAddresses(in []corev1.NodeAddress) []corev1.NodeAddress {
	var out []corev1.NodeAddress
	for _, a := range in {
		if _, err := netip.ParseAddr(a.Address); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// nodeChanged pokes only when a Node's pod ranges or addresses changed:
// Node status heartbeats must not wake the sync loop.
func nodeChanged(oldObj, newObj any, onChange func()) {
	o, ok1 := oldObj.(*corev1.Node)
	n, ok2 := newObj.(*corev1.Node)
	if !ok1 || !ok2 || fmt.Sprint(o.Spec.PodCIDRs) != fmt.Sprint(n.Spec.PodCIDRs) || o.Spec.PodCIDR != n.Spec.PodCIDR ||
		fmt.Sprint(o.Status.Addresses) != fmt.Sprint(n.Status.Addresses) {
		onChange()
	}
}

// Start starts the informers.
func (d *Detector) Start(stop <-chan struct{}) {
	for _, inf := range d.informers {
		go inf.Run(stop)
	}
}

// HasSynced is true once every cache Detect reads has synced.
func (d *Detector) HasSynced() bool {
	for _, s := range d.synced {
		if !s() {
			return false
		}
	}
	return true
}

// Current runs Detect over the caches and logs new warnings once.
func (d *Detector) Current() Result {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cached != nil && !d.changed.Swap(false) {
		return *d.cached
	}
	in := Inputs{Override: d.override}
	if d.nodes != nil {
		in.Nodes, _ = d.nodes.List(labels.Everything())
	}
	if d.cidrs != nil {
		in.ServiceCIDRs, _ = d.cidrs.List(labels.Everything())
	}
	if d.kcm != nil {
		in.KCMPods, _ = d.kcm.List(labels.Everything())
	}
	r := Detect(in)
	if w := fmt.Sprint(r.Warnings, r.Pod, r.Service); w != d.lastWarned {
		d.lastWarned = w
		for _, msg := range r.Warnings {
			d.log.Warn(msg)
		}
		d.log.WithFields(logrus.Fields{"pod": r.Pod, "podSource": r.PodSource, "service": r.Service, "serviceSource": r.ServiceSource}).Info("egress exclusions")
	}
	// Caches that have not synced yet give an incomplete answer: keep
	// asking until they have.
	if d.HasSynced() {
		d.cached = &r
	}
	return r
}

// Exclude is Current().Exclude(), for the sync loop.
func (d *Detector) Exclude() []netip.Prefix { return d.Current().Exclude() }

// Missing names the exclusions a family lacks (Current().Missing).
func (d *Detector) Missing(v6 bool) []string { return d.Current().Missing(v6) }

// PodCIDRs are the pod ranges in use (Current().Pod).
func (d *Detector) PodCIDRs() []netip.Prefix { return d.Current().Pod }

// NodeAddresses are the IP addresses of every Node.
func (d *Detector) NodeAddresses() map[netip.Addr]bool { return d.Current().NodeAddresses }
