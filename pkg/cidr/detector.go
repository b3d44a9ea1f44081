package cidr

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
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

	// client, resync and handler build the ServiceCIDR informer once the
	// API serves them (checked again while it does not: an API hiccup at
	// start-up must not mean the fallback until a restart).
	client      kube.Interface
	resync      time.Duration
	handler     cache.ResourceEventHandler
	needCIDRs   bool
	retryCIDRs  time.Duration
	informersMu sync.Mutex
	stop        <-chan struct{}
}

// NewDetector builds a Detector; onChange is called when an input changes.
// Kinds fully given by override are not watched at all.
func NewDetector(client kube.Interface, override Override, resync time.Duration, onChange func(), log *logrus.Entry) *Detector {
	d := &Detector{override: override, log: log, client: client, resync: resync, retryCIDRs: time.Minute}
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
	d.handler = handler
	if needServices {
		if kube.Served(context.Background(), client, "networking.k8s.io/v1", "servicecidrs") {
			d.addCIDRInformer()
		} else {
			d.needCIDRs = true
			log.Warn("the ServiceCIDR API (networking.k8s.io/v1) is not served (or discovery failed); Service CIDR detection falls back to kube-controller-manager's flags and asks again every minute")
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

// addCIDRInformer watches ServiceCIDRs; it starts at once when the
// detector already runs.
func (d *Detector) addCIDRInformer() {
	inf := kube.NewInformer(d.client, d.client.ServiceCIDRs(), &networkingv1.ServiceCIDR{}, kube.InformerOptions{Resync: d.resync})
	_, _ = inf.AddEventHandler(d.handler)
	// Current holds d.mu and then takes informersMu (HasSynced): never
	// the other way round.
	d.mu.Lock()
	d.cidrs = networkinglisters.NewServiceCIDRLister(inf.GetIndexer())
	d.mu.Unlock()
	d.informersMu.Lock()
	defer d.informersMu.Unlock()
	d.informers = append(d.informers, inf)
	d.synced = append(d.synced, inf.HasSynced)
	if d.stop != nil {
		go inf.Run(d.stop)
	}
}

// Start starts the informers, and keeps asking for the ServiceCIDR API
// while it is not served.
func (d *Detector) Start(stop <-chan struct{}) {
	d.informersMu.Lock()
	d.stop = stop
	for _, inf := range d.informers {
		go inf.Run(stop)
	}
	d.informersMu.Unlock()
	if !d.needCIDRs {
		return
	}
	go func() {
		t := time.NewTicker(d.retryCIDRs)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			if kube.Served(context.Background(), d.client, "networking.k8s.io/v1", "servicecidrs") {
				d.log.Info("the ServiceCIDR API is served now; Service CIDRs are detected from it")
				d.addCIDRInformer()
				d.changed.Store(true)
				return
			}
		}
	}()
}

// HasSynced is true once every cache Detect reads has synced.
func (d *Detector) HasSynced() bool {
	d.informersMu.Lock()
	synced := slices.Clone(d.synced)
	d.informersMu.Unlock()
	for _, s := range synced {
		if !s() {
			return false
		}
	}
	return true
}

// Node returns a Node from the cache (slimmed: name, UID, pod ranges,
// addresses).
func (d *Detector) Node(name string) (*corev1.Node, bool) {
	n, err := d.nodes.Get(name)
	if err != nil {
		return nil, false
	}
	return n, true
}

// NodeExists says whether a Node of that name exists (known once the
// cache synced).
func (d *Detector) NodeExists(name string) (exists, known bool) {
	if !d.HasSynced() {
		return false, false
	}
	_, ok := d.Node(name)
	return ok, true
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
