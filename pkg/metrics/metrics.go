// Package metrics exposes the daemon's Prometheus metrics and its health
// endpoints on one HTTP listener (env prometheus_server, kube-vip's name).
package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are what the sync loop reports.
type Metrics struct {
	Registry      *prometheus.Registry
	SyncDuration  prometheus.Histogram
	SyncErrors    prometheus.Counter
	ReportErrors  prometheus.Counter
	OwnedServices prometheus.Gauge
	Addresses     prometheus.Gauge
	SNATRules     prometheus.Gauge
	LeaseWrites   *prometheus.CounterVec
	Repairs       *prometheus.CounterVec
}

// New registers egressvip's metrics (and the Go and process collectors) in
// a fresh registry.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "egressvip_sync_duration_seconds", Help: "Time of one full sync of addresses and SNAT rules.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		SyncErrors:    prometheus.NewCounter(prometheus.CounterOpts{Name: "egressvip_sync_errors_total", Help: "Syncs that failed and were retried."}),
		ReportErrors:  prometheus.NewCounter(prometheus.CounterOpts{Name: "egressvip_report_errors_total", Help: "Writes of a Service's annotations or status that failed and were retried."}),
		OwnedServices: prometheus.NewGauge(prometheus.GaugeOpts{Name: "egressvip_owned_services", Help: "LoadBalancer Services this node serves."}),
		Addresses:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "egressvip_addresses", Help: "LoadBalancer IPs bound on this node's serviceInterface."}),
		SNATRules:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "egressvip_snat_rules", Help: "Egress SNAT rules (pod and family) on this node."}),
		LeaseWrites: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "egressvip_lease_writes_total",
			Help: "Lease writes by kind (heartbeat, acquire, release) and result (ok, conflict, error)."}, []string{"kind", "result"}),
		Repairs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "egressvip_repairs_total",
			Help: "Times what egressvip owns in the kernel was found changed by someone else and rewritten, by kind (firewall, address)."}, []string{"kind"}),
	}
	m.Registry.MustRegister(m.SyncDuration, m.SyncErrors, m.ReportErrors, m.OwnedServices, m.Addresses, m.SNATRules, m.LeaseWrites, m.Repairs,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves /metrics, /healthz (the process answers) and /readyz
// (ready reports true: caches synced and the first sync done).
func (m *Metrics) Handler(ready func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	if os.Getenv("egressvip_pprof") == "true" {
		// Profiling on demand, for memory and CPU investigations; off
		// by default.
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "not ready: waiting for caches and the first sync", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// Serve listens on addr until ctx ends.
func (m *Metrics) Serve(ctx context.Context, addr string, ready func() bool) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: m.Handler(ready), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
