package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }

// Pod is a pod the sandbox's "kubelet and CNI" manage: a Pod object and,
// once started, a namespace with a veth into its node's namespace.
//
// A pod goes through the steps a kubelet takes, each its own call, so that
// a test can act between them: CreatePod (Pending, no address), StartPod
// (the CNI ADD: namespace, veth, addresses; Running with its addresses in
// status, not Ready), SetPodReady (Ready). RunPod does all three.

// KubeletStartLatency is the least time from a pod's binding to the start
// of its CNI ADD that the sandbox's kubelet takes, as a real one does: it
// mounts the pod's volumes first (every pod has the projected
// service-account token; the volume manager's wait polls every 300 ms,
// kubelet's podAttachAndMountRetryInterval), then starts the pause
// container, whose CNI ADD gives the pod its address, then the containers.
// A real kubelet takes longer than this floor. Without it the sandbox
// would start a pod's traffic within a few milliseconds of the binding,
// before any node agent that watches the API (egressvip's gate too) can
// have read the pod.
const KubeletStartLatency = 300 * time.Millisecond

type Pod struct {
	Namespace, Name string
	Labels          map[string]string
	Node            *Node
	NS              string
	// IP4 and IP6 are the addresses the pod gets from StartPod (they are
	// picked when it is created, and in its status only from StartPod on).
	IP4, IP6 netip.Addr
	hostVeth string

	// bound is when the Pod object was created bound to Node.
	bound time.Time

	mu      sync.Mutex
	started bool
	servers []io.Closer
	gone    chan struct{}
}

// Bound is when the Pod object was created, bound to its node.
func (p *Pod) Bound() time.Time { return p.bound }

// Gone is closed when the pod is deleted: its processes stop then.
func (p *Pod) Gone() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.gone == nil {
		p.gone = make(chan struct{})
	}
	return p.gone
}

// RunPod creates a Pod bound to node, plumbs its namespace (addresses from
// the node's podCIDRs, routes) and reports it Running and Ready, so the real
// EndpointSlice controller picks it up.
func (c *Cluster) RunPod(ctx context.Context, namespace, name string, node *Node, labels map[string]string) (*Pod, error) {
	p, err := c.CreatePod(ctx, namespace, name, node, labels)
	if err != nil {
		return nil, err
	}
	if err := c.StartPod(ctx, p); err != nil {
		return nil, err
	}
	if err := c.SetPodReady(ctx, p, true); err != nil {
		return nil, err
	}
	return p, nil
}

// CreatePod creates a Pod bound to node (as the scheduler leaves it for the
// kubelet): Pending, no address, no namespace yet.
func (c *Cluster) CreatePod(ctx context.Context, namespace, name string, node *Node, labels map[string]string) (*Pod, error) {
	c.mu.Lock()
	c.podSeq++
	seq := c.podSeq
	c.mu.Unlock()
	node.mu.Lock()
	node.nextPod++
	idx := node.nextPod
	node.mu.Unlock()

	p := &Pod{Namespace: namespace, Name: name, Labels: maps.Clone(labels), Node: node, NS: nsName(fmt.Sprintf("p%d", seq)), hostVeth: fmt.Sprintf("vp%d", seq)}
	for _, cidr := range node.PodCIDRs {
		a := cidr.Addr()
		for range 10 + idx {
			a = a.Next()
		}
		if a.Is4() {
			p.IP4 = a
		} else {
			p.IP6 = a
		}
	}
	created, err := c.Admin.CoreV1().Pods(namespace).Create(ctx, podObject(namespace, name, node, labels), metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	p.bound = time.Now()
	created.Status = pendingStatus()
	if _, err := c.Admin.CoreV1().Pods(namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return nil, fmt.Errorf("pod %s status: %w", name, err)
	}
	c.mu.Lock()
	c.pods[namespace+"/"+name] = p
	c.mu.Unlock()
	return p, nil
}

// StartPod is the CNI ADD and the container start: the pod's namespace,
// veth, addresses and routes, then status Running with its addresses, not
// Ready. It begins no sooner than KubeletStartLatency after the pod was
// created. The pod can send as soon as it returns.
func (c *Cluster) StartPod(ctx context.Context, p *Pod) error {
	p.mu.Lock()
	started := p.started
	p.started = true
	p.mu.Unlock()
	if started {
		return fmt.Errorf("pod %s/%s already started", p.Namespace, p.Name)
	}
	if wait := KubeletStartLatency - time.Since(p.bound); wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := c.plumb(p); err != nil {
		return fmt.Errorf("pod %s network: %w", p.Name, err)
	}
	return c.updatePodStatus(ctx, p, podStatus(p.Node, p.IP4, p.IP6, false))
}

// SetPodReady reports a started pod Ready (its readiness probe passes) or
// not Ready (it fails); the EndpointSlice controller follows.
func (c *Cluster) SetPodReady(ctx context.Context, p *Pod, ready bool) error {
	p.mu.Lock()
	started := p.started
	p.mu.Unlock()
	if !started {
		return fmt.Errorf("pod %s/%s: not started (StartPod first)", p.Namespace, p.Name)
	}
	return c.updatePodStatus(ctx, p, podStatus(p.Node, p.IP4, p.IP6, ready))
}

// updatePodStatus writes status onto the current Pod object.
func (c *Cluster) updatePodStatus(ctx context.Context, p *Pod, status corev1.PodStatus) error {
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := c.Admin.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.Status.StartTime != nil {
			status.StartTime = cur.Status.StartTime
		}
		cur.Status = status
		_, err = c.Admin.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("pod %s/%s status: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// MovePod is a Deployment's rolling step for one replica: a new pod with
// old's labels runs (Ready) on node to, then old is deleted.
func (c *Cluster) MovePod(ctx context.Context, old *Pod, name string, to *Node) (*Pod, error) {
	fresh, err := c.RunPod(ctx, old.Namespace, name, to, old.Labels)
	if err != nil {
		return nil, err
	}
	return fresh, c.DeletePod(ctx, old)
}

// podObject is the Pod the sandbox creates: bound to node, one container,
// no ServiceAccount token, deleted at once.
func podObject(namespace, name string, node *Node, labels map[string]string) *corev1.Pod {
	automount := false
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node.Name,
			AutomountServiceAccountToken:  &automount,
			TerminationGracePeriodSeconds: new(int64),
			Containers:                    []corev1.Container{{Name: "app", Image: "sandbox.invalid/app:latest"}},
		},
	}
}

// pendingStatus is a bound pod's status before its sandbox exists.
func pendingStatus() corev1.PodStatus {
	now := metav1.Now()
	return corev1.PodStatus{
		Phase: corev1.PodPending,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Image: "sandbox.invalid/app:latest",
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}}},
	}
}

// readyStatus is the status the sandbox's "kubelet" reports for a pod on
// node with addresses ip4 and ip6: Running and Ready.
func readyStatus(node *Node, ip4, ip6 netip.Addr) corev1.PodStatus {
	return podStatus(node, ip4, ip6, true)
}

// podStatus is a running pod's status: its addresses, Ready or not.
func podStatus(node *Node, ip4, ip6 netip.Addr, ready bool) corev1.PodStatus {
	now := metav1.Now()
	readyCond := corev1.ConditionFalse
	if ready {
		readyCond = corev1.ConditionTrue
	}
	return corev1.PodStatus{
		Phase:     corev1.PodRunning,
		HostIP:    node.IP4.String(),
		HostIPs:   []corev1.HostIP{{IP: node.IP4.String()}, {IP: node.IP6.String()}},
		PodIP:     ip4.String(),
		PodIPs:    []corev1.PodIP{{IP: ip4.String()}, {IP: ip6.String()}},
		StartTime: &now,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: readyCond, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: readyCond, LastTransitionTime: now},
		},
		ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Ready: ready, Image: "sandbox.invalid/app:latest",
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}}},
	}
}

// plumb is the CNI ADD: a veth from the node into the pod, /32 and /128
// addresses, a route per pod on the node, a default route in the pod.
func (c *Cluster) plumb(p *Pod) error {
	if err := addNS(p.NS); err != nil {
		return err
	}
	if err := veth(p.Node.NS, p.hostVeth, p.NS, "eth0"); err != nil {
		return err
	}
	return shAll(
		// The node answers ARP for the pod's gateway on every pod veth.
		[]string{"ip", "-n", p.Node.NS, "addr", "add", "169.254.1.1/32", "dev", p.hostVeth},
		[]string{"ip", "-n", p.Node.NS, "addr", "add", "fe80::1/64", "dev", p.hostVeth, "nodad"},
		[]string{"ip", "-n", p.Node.NS, "route", "add", p.IP4.String() + "/32", "dev", p.hostVeth},
		[]string{"ip", "-n", p.Node.NS, "-6", "route", "add", p.IP6.String() + "/128", "dev", p.hostVeth},
		[]string{"ip", "-n", p.NS, "addr", "add", p.IP4.String() + "/32", "dev", "eth0"},
		[]string{"ip", "-n", p.NS, "addr", "add", p.IP6.String() + "/128", "dev", "eth0", "nodad"},
		[]string{"ip", "-n", p.NS, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"},
		[]string{"ip", "-n", p.NS, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"},
		[]string{"ip", "-n", p.NS, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"},
	)
}

// DeletePod deletes the Pod object and, if it was started, its namespace
// and servers.
func (c *Cluster) DeletePod(ctx context.Context, p *Pod) error {
	zero := int64(0)
	err := c.Admin.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	p.closeServers()
	p.mu.Lock()
	started := p.started
	if p.gone == nil {
		p.gone = make(chan struct{})
	}
	select {
	case <-p.gone:
	default:
		close(p.gone)
	}
	p.mu.Unlock()
	if started {
		delNS(p.NS)
		_, _ = sh("ip", "-n", p.Node.NS, "route", "del", p.IP4.String()+"/32")
		_, _ = sh("ip", "-n", p.Node.NS, "-6", "route", "del", p.IP6.String()+"/128")
	}
	c.mu.Lock()
	delete(c.pods, p.Namespace+"/"+p.Name)
	c.mu.Unlock()
	return err
}
