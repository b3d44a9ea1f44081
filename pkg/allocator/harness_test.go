package allocator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/kube/kubefake"
)

// fakeAPI is client-go's fake clientset with the API server's write
// semantics the allocator relies on: resourceVersions, uids and creation
// times on every object, AlreadyExists on create, Conflict on an update or
// merge patch with a stale resourceVersion, and delete preconditions.
type fakeAPI struct {
	*fake.Clientset
	mu  sync.Mutex
	rv  int
	uid int
	// patchFails, when set, fails Service patches before they apply.
	patchFails func(ns, name string) error
}

func newFakeAPI() *fakeAPI {
	s := &fakeAPI{Clientset: fake.NewClientset()}
	s.PrependReactor("*", "*", s.react)
	s.PrependWatchReactor("*", s.watch)
	return s
}

// watchKinds are the kinds of the resources the allocator watches.
var watchKinds = map[string]schema.GroupVersionKind{
	"services":   corev1.SchemeGroupVersion.WithKind("Service"),
	"configmaps": corev1.SchemeGroupVersion.WithKind("ConfigMap"),
	"leases":     coordinationv1.SchemeGroupVersion.WithKind("Lease"),
}

// watch serves a watch from a resourceVersion as the API server does,
// without the fake tracker's limit: the tracker puts the objects changed
// since that version into a channel of 100 and panics beyond that, and on
// a loaded machine more than 100 Services change between an informer's
// List and its Watch. Writes wait (s.mu) while the watch is set up, so no
// change falls between the backlog and the live events.
func (s *fakeAPI) watch(a k8stesting.Action) (bool, watch.Interface, error) {
	gvr, ns := a.GetResource(), a.GetNamespace()
	gvk, ok := watchKinds[gvr.Resource]
	wa, isWatch := a.(k8stesting.WatchAction)
	if !ok || !isWatch {
		return false, nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	from, _ := strconv.Atoi(wa.GetWatchRestrictions().ResourceVersion)
	list, err := s.Tracker().List(gvr, gvk, ns)
	if err != nil {
		return true, nil, err
	}
	items, err := meta.ExtractList(list)
	if err != nil {
		return true, nil, err
	}
	var backlog []runtime.Object
	for _, o := range items {
		m, _ := meta.Accessor(o)
		if rv, _ := strconv.Atoi(m.GetResourceVersion()); rv > from {
			backlog = append(backlog, o)
		}
	}
	inner, err := s.Tracker().Watch(gvr, ns) // no options: no existing objects
	if err != nil {
		return true, nil, err
	}
	out := make(chan watch.Event)
	w := watch.NewProxyWatcher(out)
	go relayBacklog(inner, w, out, backlog)
	return true, w, nil
}

// relayBacklog sends the backlog as added objects, then the live events of
// inner, until w is stopped.
func relayBacklog(inner watch.Interface, w *watch.ProxyWatcher, out chan<- watch.Event, backlog []runtime.Object) {
	defer close(out)
	defer inner.Stop()
	send := func(ev watch.Event) bool {
		select {
		case out <- ev:
			return true
		case <-w.StopChan():
			return false
		}
	}
	for _, o := range backlog {
		if !send(watch.Event{Type: watch.Added, Object: o}) {
			return
		}
	}
	for ev := range inner.ResultChan() {
		if !send(ev) {
			return
		}
	}
}

func (s *fakeAPI) react(a k8stesting.Action) (bool, runtime.Object, error) {
	switch a.GetVerb() {
	case "create", "update", "patch", "delete":
	default:
		return false, nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	tracker := s.Tracker()
	gvr := a.GetResource()
	ns := a.GetNamespace()
	switch a := a.(type) {
	case k8stesting.CreateActionImpl:
		obj := a.GetObject().DeepCopyObject()
		m, _ := meta.Accessor(obj)
		if _, err := tracker.Get(gvr, ns, m.GetName()); err == nil {
			return true, nil, apierrors.NewAlreadyExists(gvr.GroupResource(), m.GetName())
		}
		s.rv++
		s.uid++
		m.SetResourceVersion(strconv.Itoa(s.rv))
		m.SetUID(types.UID(fmt.Sprintf("uid-%d", s.uid)))
		if ts := m.GetCreationTimestamp(); ts.IsZero() {
			m.SetCreationTimestamp(metav1.NewTime(time.Unix(int64(s.uid), 0)))
		}
		return true, obj, tracker.Create(gvr, obj, ns)
	case k8stesting.UpdateActionImpl:
		obj := a.GetObject().DeepCopyObject()
		m, _ := meta.Accessor(obj)
		cur, err := tracker.Get(gvr, ns, m.GetName())
		if err != nil {
			return true, nil, err
		}
		cm, _ := meta.Accessor(cur)
		if m.GetResourceVersion() != cm.GetResourceVersion() {
			return true, nil, apierrors.NewConflict(gvr.GroupResource(), m.GetName(), errors.New("stale resourceVersion"))
		}
		s.rv++
		m.SetResourceVersion(strconv.Itoa(s.rv))
		m.SetUID(cm.GetUID())
		m.SetCreationTimestamp(cm.GetCreationTimestamp())
		return true, obj, tracker.Update(gvr, obj, ns)
	case k8stesting.PatchActionImpl:
		if a.GetPatchType() != types.MergePatchType {
			return true, nil, fmt.Errorf("fakeAPI: only merge patches")
		}
		if s.patchFails != nil {
			if err := s.patchFails(ns, a.GetName()); err != nil {
				return true, nil, err
			}
		}
		cur, err := tracker.Get(gvr, ns, a.GetName())
		if err != nil {
			return true, nil, err
		}
		var patch map[string]any
		if err := json.Unmarshal(a.GetPatch(), &patch); err != nil {
			return true, nil, apierrors.NewBadRequest(err.Error())
		}
		cm, _ := meta.Accessor(cur)
		if md, ok := patch["metadata"].(map[string]any); ok {
			if rv, ok := md["resourceVersion"].(string); ok && rv != cm.GetResourceVersion() {
				return true, nil, apierrors.NewConflict(gvr.GroupResource(), a.GetName(), errors.New("stale resourceVersion"))
			}
		}
		raw, _ := json.Marshal(cur)
		var doc map[string]any
		_ = json.Unmarshal(raw, &doc)
		merged, _ := json.Marshal(mergePatch(doc, patch))
		// Decode the merged document into a zeroed object of cur's type.
		obj := cur.DeepCopyObject()
		switch o := obj.(type) {
		case *corev1.Service:
			*o = corev1.Service{}
		case *coordinationv1.Lease:
			*o = coordinationv1.Lease{}
		}
		if err := json.Unmarshal(merged, obj); err != nil {
			return true, nil, err
		}
		m, _ := meta.Accessor(obj)
		s.rv++
		m.SetResourceVersion(strconv.Itoa(s.rv))
		return true, obj, tracker.Update(gvr, obj, ns)
	case k8stesting.DeleteActionImpl:
		cur, err := tracker.Get(gvr, ns, a.GetName())
		if err != nil {
			return true, nil, err
		}
		cm, _ := meta.Accessor(cur)
		if p := a.GetDeleteOptions().Preconditions; p != nil {
			if (p.UID != nil && *p.UID != cm.GetUID()) || (p.ResourceVersion != nil && *p.ResourceVersion != cm.GetResourceVersion()) {
				return true, nil, apierrors.NewConflict(gvr.GroupResource(), a.GetName(), errors.New("precondition failed"))
			}
		}
		return true, nil, tracker.Delete(gvr, ns, a.GetName())
	}
	return false, nil, nil
}

// mergePatch is RFC 7386.
func mergePatch(doc, patch map[string]any) map[string]any {
	if doc == nil {
		doc = map[string]any{}
	}
	for k, v := range patch {
		switch v := v.(type) {
		case nil:
			delete(doc, k)
		case map[string]any:
			sub, _ := doc[k].(map[string]any)
			doc[k] = mergePatch(sub, v)
		default:
			doc[k] = v
		}
	}
	return doc
}

// testClient serves Client from a fakeAPI; every watch it hands out
// delivers events late by lag (in order), so its informers lag.
type testClient struct {
	kube.Interface
	api *fakeAPI
	lag func() time.Duration
}

func newTestClient(api *fakeAPI, maxLag time.Duration) *testClient {
	c := &testClient{Interface: kubefake.Wrap(api.Clientset), api: api}
	if maxLag > 0 {
		c.lag = func() time.Duration { return rand.N(maxLag) }
	}
	return c
}

func (c *testClient) IsWatchListSemanticsUnSupported() bool { return true }

func (c *testClient) ConfigMaps(ns string) kube.ListWatcher[*corev1.ConfigMapList] {
	return lagLW[*corev1.ConfigMapList]{c.api.CoreV1().ConfigMaps(ns), c.lag}
}

func (c *testClient) Services(ns string) kube.ServiceClient {
	return lagServices{c.api.CoreV1().Services(ns), c.lag}
}

func (c *testClient) Leases(ns string) kube.LeaseClient {
	return lagLeases{c.api.CoordinationV1().Leases(ns), c.lag}
}

type lagLW[L runtime.Object] struct {
	kube.ListWatcher[L]
	lag func() time.Duration
}

func (l lagLW[L]) Watch(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
	return lagged(l.ListWatcher.Watch(ctx, o))(l.lag)
}

type serviceClient interface {
	kube.ServiceClient
}

type lagServices struct {
	serviceClient
	lag func() time.Duration
}

func (l lagServices) Watch(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
	return lagged(l.serviceClient.Watch(ctx, o))(l.lag)
}

type leaseClient interface {
	kube.LeaseClient
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error
}

type lagLeases struct {
	leaseClient
	lag func() time.Duration
}

func (l lagLeases) Watch(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
	return lagged(l.leaseClient.Watch(ctx, o))(l.lag)
}

// lagged delays every event of w by lag(), keeping their order.
func lagged(w watch.Interface, err error) func(lag func() time.Duration) (watch.Interface, error) {
	return func(lag func() time.Duration) (watch.Interface, error) {
		if err != nil || lag == nil {
			return w, err
		}
		out := make(chan watch.Event)
		pw := watch.NewProxyWatcher(out)
		go relayLagged(w, pw, out, lag)
		return pw, nil
	}
}

// relayLagged sends the events of inner lag() late, in order, until w is
// stopped.
func relayLagged(inner watch.Interface, w *watch.ProxyWatcher, out chan<- watch.Event, lag func() time.Duration) {
	type item struct {
		ev  watch.Event
		due time.Time
	}
	defer close(out)
	defer inner.Stop()
	var q []item
	var last time.Time
	in := inner.ResultChan()
	for in != nil || len(q) > 0 {
		var send chan<- watch.Event
		var head watch.Event
		var timer <-chan time.Time
		if len(q) > 0 {
			if d := time.Until(q[0].due); d <= 0 {
				send, head = out, q[0].ev
			} else {
				timer = time.After(d)
			}
		}
		select {
		case ev, ok := <-in:
			if !ok {
				in = nil
				continue
			}
			due := time.Now().Add(lag())
			if due.Before(last) {
				due = last
			}
			last = due
			q = append(q, item{ev, due})
		case send <- head:
			q = q[1:]
		case <-timer:
		case <-w.StopChan():
			return
		}
	}
}

// recorder keeps Events.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) Event(o runtime.Object, typ, reason, msg string) {
	m, _ := meta.Accessor(o)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, fmt.Sprintf("%s %s/%s %s: %s", typ, m.GetNamespace(), m.GetName(), reason, msg))
}

func (r *recorder) Eventf(o runtime.Object, typ, reason, f string, args ...any) {
	r.Event(o, typ, reason, fmt.Sprintf(f, args...))
}

func (r *recorder) AnnotatedEventf(o runtime.Object, _ map[string]string, typ, reason, f string, args ...any) {
	r.Eventf(o, typ, reason, f, args...)
}

// matching lists the Events that contain every part.
func (r *recorder) matching(parts ...string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range r.events {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(e, p) }) {
			out = append(out, e)
		}
	}
	return out
}

const daemonNS = "egressvip"

func testLog(t *testing.T) *logrus.Entry {
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	l.SetOutput(testWriter{t})
	return logrus.NewEntry(l)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (s *fakeAPI) setConfig(t *testing.T, data map[string]string) {
	t.Helper()
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kubevip"}, Data: data}
	ctx := context.Background()
	cur, err := s.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubevip", metav1.GetOptions{})
	if err == nil {
		cm.ResourceVersion = cur.ResourceVersion
		_, err = s.CoreV1().ConfigMaps("kube-system").Update(ctx, cm, metav1.UpdateOptions{})
	} else {
		_, err = s.CoreV1().ConfigMaps("kube-system").Create(ctx, cm, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

type svcOpt func(*corev1.Service)

func ports(ps ...int32) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.Ports = nil
		for _, p := range ps {
			s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Port: p, Protocol: corev1.ProtocolTCP})
		}
	}
}

func dual(policy corev1.IPFamilyPolicy, fams ...corev1.IPFamily) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.IPFamilyPolicy = &policy
		s.Spec.IPFamilies = fams
	}
}

func annotated(v string) svcOpt {
	return func(s *corev1.Service) { s.Annotations = map[string]string{AnnotationLoadBalancerIPs: v} }
}

func lbService(ns, name string, opts ...svcOpt) *corev1.Service {
	single := corev1.IPFamilyPolicySingleStack
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, IPFamilyPolicy: &single,
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Ports:      []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func (s *fakeAPI) create(t testing.TB, svc *corev1.Service) {
	t.Helper()
	if _, err := s.CoreV1().Services(svc.Namespace).Create(context.Background(), svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// addresses is every Service's kube-vip.io/loadbalancerIPs by namespace/name.
func (s *fakeAPI) addresses(t testing.TB) map[string]string {
	t.Helper()
	l, err := s.CoreV1().Services("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, svc := range l.Items {
		out[svc.Namespace+"/"+svc.Name] = svc.Annotations[AnnotationLoadBalancerIPs]
	}
	return out
}

func (s *fakeAPI) claimLeases(t testing.TB) map[string]*coordinationv1.Lease {
	t.Helper()
	l, err := s.CoordinationV1().Leases(daemonNS).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*coordinationv1.Lease{}
	for i := range l.Items {
		out[l.Items[i].Annotations[AnnotationAddress]] = &l.Items[i]
	}
	return out
}

// waitFor polls cond (a condition, not a guess at timing) until it holds.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 5*time.Millisecond, timeout, true,
		func(context.Context) (bool, error) { return cond(), nil })
	if err != nil {
		t.Fatalf("timed out waiting for %s", what)
	}
}

// start runs an allocator until the returned stop is called (or the test
// ends) and returns once Run returned.
func start(t testing.TB, a *Allocator) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("Run: %v", err)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
