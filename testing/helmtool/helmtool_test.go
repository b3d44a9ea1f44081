package helmtool

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Version names what testing/tools/helm/go.mod pins: the cache key and
// the module must not drift apart.
func TestVersionMatchesGoMod(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(ModuleDir(), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	want := "require helm.sh/helm/v4 " + Version + "\n"
	if !strings.Contains(string(data), want) {
		t.Errorf("testing/tools/helm/go.mod does not say %q", strings.TrimSpace(want))
	}
}

// EnsureHelm gives a helm that runs and reports the pinned version.
func TestEnsureHelm(t *testing.T) {
	bin := Require(t)
	if got := filepath.Dir(bin); got != filepath.Join(CacheDir(), "helm-"+Version) {
		t.Errorf("helm at %s, want it in the cache keyed by version", bin)
	}
	out, err := exec.Command(bin, "version", "--template", "{{.Version}}").CombinedOutput()
	if err != nil {
		t.Fatalf("helm version: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != Version {
		t.Errorf("helm version %q, want %s", got, Version)
	}
	again, err := EnsureHelm()
	if err != nil || again != bin {
		t.Errorf("second EnsureHelm: %s, %v; want %s from the cache", again, err, bin)
	}
}

func TestCacheDirHonoursEnv(t *testing.T) {
	t.Setenv("EGRESSVIP_CACHE", "/tmp/somewhere")
	if got := CacheDir(); got != "/tmp/somewhere" {
		t.Errorf("CacheDir() = %s with EGRESSVIP_CACHE set", got)
	}
}
