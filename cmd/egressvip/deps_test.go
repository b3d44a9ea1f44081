package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestLinksOnlyTheAPIGroupsItUses guards the daemon's fixed memory cost:
// client-go's clientset, informer factory and apply configurations link
// and register every API group (about 10 MiB more resident memory per
// node); pkg/kube uses four.
func TestLinksOnlyTheAPIGroupsItUses(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	allowed := map[string]bool{
		"k8s.io/api/core/v1":         true,
		"k8s.io/api/discovery/v1":    true,
		"k8s.io/api/coordination/v1": true,
		"k8s.io/api/networking/v1":   true,
	}
	groups := 0
	for _, p := range strings.Fields(string(out)) {
		switch {
		case strings.HasPrefix(p, "k8s.io/api/"):
			if !allowed[p] {
				t.Errorf("links %s", p)
			}
			groups++
		case strings.HasPrefix(p, "k8s.io/client-go/kubernetes"), strings.HasPrefix(p, "k8s.io/client-go/informers"),
			strings.HasPrefix(p, "k8s.io/client-go/applyconfigurations"), p == "k8s.io/client-go/discovery":
			t.Errorf("links %s", p)
		}
	}
	if groups != len(allowed) {
		t.Errorf("links %d of the API groups it uses, want %d", groups, len(allowed))
	}
}
