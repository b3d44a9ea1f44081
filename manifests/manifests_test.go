// Package manifests holds the deployment YAML; its test is the client-side
// validation `kubectl apply --dry-run=client` would do: every document
// decodes strictly into a known type.
package manifests

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
)

func decodeAll(t *testing.T, path string) []runtime.Object {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	strict := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	reader := utilyaml.NewYAMLReader(bufioReader(data))
	var out []runtime.Object
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, _, err := strict.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: %v\n%s", path, err, doc)
		}
		out = append(out, obj)
	}
	return out
}

func TestManifestsDecodeStrictly(t *testing.T) {
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) < 3 {
		t.Fatalf("want the manifests, got %v (%v)", files, err)
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			if objs := decodeAll(t, f); len(objs) == 0 {
				t.Fatalf("%s holds no object", f)
			}
		})
	}
}

func TestDaemonSetIsLeastPrivileged(t *testing.T) {
	var ds *appsv1.DaemonSet
	for _, o := range decodeAll(t, "daemonset.yaml") {
		if d, ok := o.(*appsv1.DaemonSet); ok {
			ds = d
		}
	}
	if ds == nil {
		t.Fatal("no DaemonSet in daemonset.yaml")
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("DaemonSet must use hostNetwork to bind addresses on the node")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(spec.Containers))
	}
	c := spec.Containers[0]
	caps := c.SecurityContext.Capabilities
	if len(caps.Drop) != 1 || caps.Drop[0] != "ALL" {
		t.Errorf("capabilities must drop ALL, got %v", caps.Drop)
	}
	want := map[corev1.Capability]bool{"NET_ADMIN": true, "NET_RAW": true}
	for _, a := range caps.Add {
		if !want[a] {
			t.Errorf("unexpected capability %s", a)
		}
		delete(want, a)
	}
	if len(want) > 0 {
		t.Errorf("missing capabilities %v", want)
	}
	var nodeName bool
	for _, e := range c.Env {
		if e.Name == "vip_nodename" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeName = true
		}
	}
	if !nodeName {
		t.Error("vip_nodename must come from the downward API (spec.nodeName)")
	}
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }
