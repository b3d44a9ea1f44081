package metrics

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

func get(t *testing.T, srv *httptest.Server, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestEndpoints(t *testing.T) {
	m := New()
	var ready, stuck atomic.Bool
	srv := httptest.NewServer(m.Handler(Health{
		Alive: func() error {
			if stuck.Load() {
				return errors.New("sync loop stuck")
			}
			return nil
		},
		Ready: func() error {
			if !ready.Load() {
				return errors.New("waiting for the first sync")
			}
			return nil
		},
	}))
	defer srv.Close()

	if code, _ := get(t, srv, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d", code)
	}
	if code, body := get(t, srv, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "first sync") {
		t.Fatalf("/readyz before the first sync = %d %q, want 503 with the reason", code, body)
	}
	ready.Store(true)
	if code, _ := get(t, srv, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz after the first sync = %d", code)
	}
	stuck.Store(true)
	if code, body := get(t, srv, "/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "stuck") {
		t.Fatalf("/healthz with a stuck loop = %d %q, want 503 with the reason", code, body)
	}

	m.OwnedServices.Set(3)
	m.SyncErrors.Inc()
	m.SyncDuration.Observe(0.004)
	_, body := get(t, srv, "/metrics")
	for _, want := range []string{"egressvip_owned_services 3", "egressvip_sync_errors_total 1", "egressvip_sync_duration_seconds_count 1", "go_goroutines"} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
