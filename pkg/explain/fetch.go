package explain

import (
	"context"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/cidr"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube"
)

// Fetch reads from the API server what Build needs to explain target,
// with the daemon's permissions (manifests/rbac.yaml): lists only.
func Fetch(ctx context.Context, client kube.Interface, target types.NamespacedName, cfg Config) (Objects, error) {
	var o Objects
	// Services: those egressvip serves, and the target wherever it is.
	namespaces := []string{cfg.Namespace}
	if cfg.Namespace != "" && cfg.Namespace != target.Namespace {
		namespaces = append(namespaces, target.Namespace)
	}
	for _, ns := range namespaces {
		l, err := client.Services(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return o, fmt.Errorf("list Services: %w", err)
		}
		for i := range l.Items {
			o.Services = append(o.Services, &l.Items[i])
		}
	}
	// EndpointSlices of the target's namespace: a Service of another
	// namespace never shares the target's group.
	sl, err := client.EndpointSlices(target.Namespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName})
	if err != nil {
		return o, fmt.Errorf("list EndpointSlices of namespace %s: %w", target.Namespace, err)
	}
	for i := range sl.Items {
		o.EndpointSlices = append(o.EndpointSlices, &sl.Items[i])
	}
	// Pods: the target's namespace, and every pod of the nodes its
	// endpoints and selected pods run on (each daemon trusts an endpoint
	// only if it is one of its node's pods, whatever their namespace).
	pl, err := client.Pods(target.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return o, fmt.Errorf("list pods of namespace %s: %w", target.Namespace, err)
	}
	for i := range pl.Items {
		o.Pods = append(o.Pods, &pl.Items[i])
	}
	for _, node := range podNodes(o, target) {
		l, err := client.Pods("").List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String()})
		if err != nil {
			return o, fmt.Errorf("list pods of node %s: %w", node, err)
		}
		for i := range l.Items {
			if l.Items[i].Namespace != target.Namespace {
				o.Pods = append(o.Pods, &l.Items[i])
			}
		}
	}
	nl, err := client.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return o, fmt.Errorf("list Nodes: %w", err)
	}
	for i := range nl.Items {
		o.Nodes = append(o.Nodes, &nl.Items[i])
	}
	// ServiceCIDRs are missing from older API servers; the detection
	// falls back as the daemon's does.
	if kube.Served(ctx, client, "networking.k8s.io/v1", "servicecidrs") {
		cl, err := client.ServiceCIDRs().List(ctx, metav1.ListOptions{})
		if err != nil {
			return o, fmt.Errorf("list ServiceCIDRs: %w", err)
		}
		for i := range cl.Items {
			o.ServiceCIDRs = append(o.ServiceCIDRs, &cl.Items[i])
		}
	}
	if len(cfg.Override.Pod) == 0 || len(cfg.Override.Service) == 0 {
		kl, err := client.Pods(metav1.NamespaceSystem).List(ctx, metav1.ListOptions{LabelSelector: cidr.KCMSelector})
		if err != nil {
			return o, fmt.Errorf("list kube-controller-manager pods: %w", err)
		}
		for i := range kl.Items {
			o.KCMPods = append(o.KCMPods, &kl.Items[i])
		}
	}
	// Leases: heartbeats, address and global Leases (as the daemon's
	// informer selects them), and every Lease of the target's namespace
	// (Service Leases, also unlabelled ones of the release before
	// heartbeats).
	ll, err := client.Leases(cfg.DaemonNamespace).List(ctx, metav1.ListOptions{LabelSelector: election.LabelRole + " in (" +
		election.RoleHeartbeat + "," + election.RoleGlobal + "," + election.RoleAddress + ")"})
	if err != nil {
		return o, fmt.Errorf("list Leases of namespace %s: %w", cfg.DaemonNamespace, err)
	}
	for i := range ll.Items {
		o.Leases = append(o.Leases, &ll.Items[i])
	}
	ll, err = client.Leases(target.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return o, fmt.Errorf("list Leases of namespace %s: %w", target.Namespace, err)
	}
	for i := range ll.Items {
		l := &ll.Items[i]
		switch l.Labels[election.LabelRole] {
		case election.RoleHeartbeat, election.RoleGlobal, election.RoleAddress:
			if l.Namespace == cfg.DaemonNamespace {
				continue // listed above
			}
		}
		o.Leases = append(o.Leases, l)
	}
	return o, nil
}

// podNodes are the nodes of the target's endpoints and selected pods,
// sorted.
func podNodes(o Objects, target types.NamespacedName) []string {
	var out []string
	for _, sl := range o.EndpointSlices {
		if sl.Labels[discoveryv1.LabelServiceName] != target.Name {
			continue
		}
		for _, e := range sl.Endpoints {
			if e.NodeName != nil && *e.NodeName != "" {
				out = append(out, *e.NodeName)
			}
		}
	}
	var svc *corev1.Service
	for _, s := range o.Services {
		if s.Namespace == target.Namespace && s.Name == target.Name {
			svc = s
		}
	}
	if svc != nil && len(svc.Spec.Selector) > 0 {
		sel := labels.SelectorFromSet(svc.Spec.Selector)
		for _, p := range o.Pods {
			if p.Spec.NodeName != "" && sel.Matches(labels.Set(p.Labels)) {
				out = append(out, p.Spec.NodeName)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
