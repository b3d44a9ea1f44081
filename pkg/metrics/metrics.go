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
	// Steered counts this node's pods whose egress is steered to the
	// node holding their Service's address.
	Steered prometheus.Gauge
	// Conflicts counts frames from other hosts that claimed or probed an
	// address this node held; InUse addresses another host still
	// answered for when this node was about to bind them.
	Conflicts prometheus.Counter
	InUse     prometheus.Counter
	// ApplyFailures counts groups whose addresses or rules could not be
	// applied (each then backs off and is given up meanwhile).
	ApplyFailures prometheus.Counter
	// Refused is the number of LoadBalancer IPs refused by the admission
	// rules on this node's last sync.
	Refused prometheus.Gauge
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
		Steered: prometheus.NewGauge(prometheus.GaugeOpts{Name: "egressvip_steered_endpoints",
			Help: "This node's egress pods whose traffic is steered to the node holding their Service's address."}),
		Conflicts: prometheus.NewCounter(prometheus.CounterOpts{Name: "egressvip_address_conflicts_total",
			Help: "Frames from another host that announced or probed an address this node held."}),
		InUse: prometheus.NewCounter(prometheus.CounterOpts{Name: "egressvip_addresses_in_use_total",
			Help: "Addresses another host still answered for when this node probed before binding them."}),
		ApplyFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: "egressvip_apply_failures_total",
			Help: "Addresses or rules of a Service that could not be applied; the Service backs off, others are unaffected."}),
		Refused: prometheus.NewGauge(prometheus.GaugeOpts{Name: "egressvip_refused_addresses",
			Help: "LoadBalancer IPs refused by the admission rules (LoadBalancerIPRefused, LoadBalancerIPConflict)."}),
	}
	m.Registry.MustRegister(m.SyncDuration, m.SyncErrors, m.ReportErrors, m.OwnedServices, m.Addresses, m.SNATRules, m.LeaseWrites, m.Repairs,
		m.Steered, m.Conflicts, m.InUse, m.ApplyFailures, m.Refused,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Health is what /healthz and /readyz ask.
type Health struct {
	// Alive is false when the process should be restarted: its sync loop
	// has not completed for several resync periods.
	Alive func() error
	// Ready is nil once the caches synced, the first sync succeeded and
	// the heartbeat can be written.
	Ready func() error
}

// Handler serves /metrics, /healthz (the sync loop is alive, as
// kube-proxy's healthz) and /readyz (caches synced, first sync done,
// heartbeat written).
func (m *Metrics) Handler(h Health) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	if os.Getenv("egressvip_pprof") == "true" {
		// Profiling on demand, for memory and CPU investigations; off
		// by default.
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	check := func(f func() error) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if f != nil {
				if err := f(); err != nil {
					http.Error(w, err.Error(), http.StatusServiceUnavailable)
					return
				}
			}
			_, _ = w.Write([]byte("ok\n"))
		}
	}
	mux.HandleFunc("/healthz", check(h.Alive))
	mux.HandleFunc("/readyz", check(h.Ready))
	return mux
}

// Serve listens on addr until ctx ends.
func (m *Metrics) Serve(ctx context.Context, addr string, h Health) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: m.Handler(h), ReadHeaderTimeout: 5 * time.Second}
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
