package kube

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
)

// request is what the test server saw of one request.
type request struct {
	method, path, accept, contentType string
	body                              []byte
}

// server answers every request with JSON: an APIResourceList for
// discovery, otherwise the object it was sent (or an empty one of kind).
func server(t *testing.T) (*Client, func() []request) {
	t.Helper()
	var mu sync.Mutex
	var seen []request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, request{r.Method, r.URL.Path, r.Header.Get("Accept"), r.Header.Get("Content-Type"), body})
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/apis/networking.k8s.io/v1":
			_ = json.NewEncoder(w).Encode(metav1.APIResourceList{GroupVersion: "networking.k8s.io/v1",
				APIResources: []metav1.APIResource{{Name: "servicecidrs"}, {Name: "ingresses", Namespaced: true}}})
		case r.URL.Path == "/api/v1":
			_ = json.NewEncoder(w).Encode(metav1.APIResourceList{GroupVersion: "v1",
				APIResources: []metav1.APIResource{{Name: "services", Namespaced: true}}})
		case strings.HasPrefix(r.URL.Path, "/apis/example.com/"):
			http.Error(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`, http.StatusNotFound)
		case strings.HasSuffix(r.URL.Path, "/services"):
			_ = json.NewEncoder(w).Encode(corev1.ServiceList{TypeMeta: metav1.TypeMeta{Kind: "ServiceList", APIVersion: "v1"},
				Items: []corev1.Service{{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"}}}})
		case r.Method == http.MethodPut || r.Method == http.MethodPost:
			// Sent as protobuf; answered as JSON.
			obj, _, err := Codecs.UniversalDeserializer().Decode(body, nil, nil)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			_ = json.NewEncoder(w).Encode(obj)
		default:
			_, _ = w.Write([]byte(`{"kind":"Event","apiVersion":"v1","metadata":{"name":"e"}}`))
		}
	}))
	t.Cleanup(srv.Close)
	c, err := New(&rest.Config{Host: srv.URL, QPS: 100, Burst: 100})
	if err != nil {
		t.Fatal(err)
	}
	return c, func() []request {
		mu.Lock()
		defer mu.Unlock()
		return append([]request(nil), seen...)
	}
}

func TestClientPathsAndEncoding(t *testing.T) {
	c, seen := server(t)
	ctx := context.Background()
	list, err := c.Services("shop").List(ctx, metav1.ListOptions{LabelSelector: "a=b"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 1 || list.Items[0].Name != "web" {
		t.Fatalf("listed %+v", list.Items)
	}
	holder := "node-1"
	l, err := c.Leases("shop").Update(ctx, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "egressvip-web", Namespace: "shop", ResourceVersion: "7"},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder}}, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != holder || l.ResourceVersion != "7" {
		t.Fatalf("update returned %+v", l)
	}
	sink := &EventSink{Client: c}
	if _, err := sink.Create(&corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "web.1", Namespace: "shop"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := sink.Patch(&corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "web.1", Namespace: "shop"}}, []byte(`{"count":2}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Services("shop").Patch(ctx, "web", types.MergePatchType, []byte(`{}`), metav1.PatchOptions{}, "status"); err != nil {
		t.Fatal(err)
	}

	got := seen()
	want := []struct{ method, path, contentType string }{
		{"GET", "/api/v1/namespaces/shop/services", ""},
		{"PUT", "/apis/coordination.k8s.io/v1/namespaces/shop/leases/egressvip-web", "application/vnd.kubernetes.protobuf"},
		{"POST", "/api/v1/namespaces/shop/events", "application/vnd.kubernetes.protobuf"},
		{"PATCH", "/api/v1/namespaces/shop/events/web.1", string(types.StrategicMergePatchType)},
		{"PATCH", "/api/v1/namespaces/shop/services/web/status", string(types.MergePatchType)},
	}
	if len(got) != len(want) {
		t.Fatalf("%d requests, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		g := got[i]
		if g.method != w.method || g.path != w.path || g.contentType != w.contentType {
			t.Errorf("request %d: %s %s (%s), want %s %s (%s)", i, g.method, g.path, g.contentType, w.method, w.path, w.contentType)
		}
		// Built-in types prefer protobuf, as client-go's clientset does,
		// and accept JSON (what this server answers).
		if !strings.HasPrefix(g.accept, "application/vnd.kubernetes.protobuf") || !strings.Contains(g.accept, "application/json") {
			t.Errorf("request %d accepts %q", i, g.accept)
		}
	}
}

func TestServed(t *testing.T) {
	c, seen := server(t)
	ctx := context.Background()
	if !Served(ctx, c, "networking.k8s.io/v1", "servicecidrs") {
		t.Error("servicecidrs not served")
	}
	if !Served(ctx, c, "v1", "services") {
		t.Error("the core group's services not served (discovery path of the core group)")
	}
	if Served(ctx, c, "networking.k8s.io/v1", "ipaddresses") {
		t.Error("ipaddresses served")
	}
	// An error (a group the server does not know) is "not served"; the
	// caller falls back.
	if _, err := c.ServerResources(ctx, "example.com/v1"); err == nil {
		t.Error("discovery of an unknown group did not fail")
	}
	if Served(ctx, c, "example.com/v1", "things") {
		t.Error("an unknown group served")
	}
	if got := seen(); got[0].path != "/apis/networking.k8s.io/v1" || got[0].accept != "application/json" {
		t.Fatalf("discovery request %+v", got[0])
	}
}

func TestNewNeedsBurst(t *testing.T) {
	if _, err := New(&rest.Config{Host: "https://127.0.0.1:1", QPS: 5}); err == nil {
		t.Fatal("QPS without burst accepted")
	}
}
