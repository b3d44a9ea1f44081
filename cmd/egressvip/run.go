package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/egressvip/egressvip/pkg/allocator"
	"github.com/egressvip/egressvip/pkg/cidr"
	"github.com/egressvip/egressvip/pkg/compat"
	"github.com/egressvip/egressvip/pkg/config"
	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/metrics"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/node"
	"github.com/egressvip/egressvip/pkg/plan"
	"github.com/egressvip/egressvip/pkg/snat"
	"github.com/egressvip/egressvip/pkg/steer"
)

// globalLeaseName is the one Lease used when svc_election=false. The dot
// keeps it apart from every per-Service Lease name (Service names have none).
const globalLeaseName = "egressvip.services"

// eventCacheSize bounds each of the event correlator's caches (measured:
// 0.74 MB retained after Events on 2,000 Services, against 2.9 MB).
const eventCacheSize = 512

func loadConfig(log *logrus.Logger) (config.Config, error) {
	cfg, err := config.Load(os.Getenv, os.Hostname, os.ReadFile)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		return cfg, configError{err}
	}
	level, _ := logrus.ParseLevel(cfg.LogLevel)
	log.SetLevel(level)
	if cfg.LogFormat == "json" {
		log.SetFormatter(&logrus.JSONFormatter{})
	}
	return cfg, nil
}

// serviceInterface is vip_servicesinterface, else vip_interface, else the
// interface of the default route.
func serviceInterface(cfg config.Config) (string, error) {
	if iface := cfg.EffectiveServiceInterface(); iface != "" {
		return iface, nil
	}
	iface, err := config.DefaultRouteInterface(nil)
	if err != nil {
		return "", configError{fmt.Errorf("vip_interface and vip_servicesinterface are unset and the default route's interface cannot be found: %w", err)}
	}
	return iface, nil
}

func restConfig(cfg config.Config) (*rest.Config, error) {
	if cfg.Kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	}
	return rest.InClusterConfig()
}

func run(ctx context.Context, logger *logrus.Logger) error {
	cfg, err := loadConfig(logger)
	if err != nil {
		return err
	}
	log := logrus.NewEntry(logger).WithField("node", cfg.NodeName)
	log.WithField("version", version).Info("egressvip starting")
	if !cfg.ServicesEnabled {
		log.Warn("svc_enable=false: no LoadBalancer Services are served; idling")
		<-ctx.Done()
		return nil
	}
	iface, err := serviceInterface(cfg)
	if err != nil {
		return err
	}
	log = log.WithField("interface", iface)

	rc, err := restConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client configuration: %w", err)
	}
	rc.UserAgent = "egressvip/" + version
	// One client per budget, each with its own rate limiter, so that no
	// write waits behind another kind: watches, the heartbeat, the
	// election's acquisitions and releases, and the reporter.
	newClient := func(qps float32, burst int) (kube.Interface, error) {
		c := rest.CopyConfig(rc)
		c.QPS, c.Burst = qps, burst
		return kube.New(c)
	}
	client, err := newClient(20, 40)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	heartbeatClient, err := newClient(5, 10)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	electionClient, err := newClient(cfg.ElectionQPS, cfg.ElectionBurst)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	reportClient, err := newClient(cfg.ReportQPS, cfg.ReportBurst)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}

	// client-go's event correlator keeps three LRU caches of 4,096 keys
	// (object and reason) for deduplication and spam filtering: about 1.4 KB
	// per Service that ever had an Event, 2.9 MB at 2,000 Services and
	// twice that after Service churn. egressvip raises each Event once per
	// Service and reason (pkg/plan), so the caches only need to cover the
	// recent ones.
	broadcaster := record.NewBroadcaster(record.WithContext(ctx),
		record.WithCorrelatorOptions(record.CorrelatorOptions{LRUCacheSize: eventCacheSize}))
	broadcaster.StartRecordingToSink(&kube.EventSink{Client: reportClient})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(kube.Scheme, corev1.EventSource{Component: "egressvip", Host: cfg.NodeName})

	timing := election.Timing{LeaseDuration: cfg.LeaseDuration, RenewDeadline: cfg.RenewDeadline, RetryPeriod: cfg.RetryPeriod}
	// An address the daemon holds stays in the kernel only as long as its
	// sync loop keeps renewing it: shorter than any other node needs to
	// take it over, so a killed or frozen daemon's addresses are gone
	// first.
	addrs, err := netif.New(netif.Config{Interface: iface, Announce: cfg.ARP, Log: log, Lifetime: timing.AddressLifetime()})
	if err != nil {
		return fmt.Errorf("serviceInterface: %w", err)
	}
	var tunnel *model.Tunnel
	if cfg.Tunnel == "vxlan" {
		tunnel = &model.Tunnel{VNI: cfg.TunnelVNI, Port: cfg.TunnelPort, Device: tunnelDevice}
	}
	var snatw node.SNAT
	snatUnavailable := ""
	snatCfg := snat.Config{Backend: cfg.Backend, NFTables: cfg.EgressWithNFTables, Mark: cfg.Mark, Log: log}
	if tunnel != nil {
		snatCfg.TunnelDevice, snatCfg.TunnelPort, snatCfg.PodCIDRs = tunnel.Device, tunnel.Port, cfg.PodCIDRs
	}
	if m, err := snat.New(snatCfg); err != nil {
		// Addresses still work without a firewall backend; egress
		// Services get an Event saying why they are not egressed.
		snatUnavailable = err.Error()
		log.WithError(err).Error("egress SNAT unavailable on this node")
	} else {
		log.WithField("backend", m.Backend()).Info("egress SNAT backend")
		snatw = m
	}
	leftCtx, cancelLeft := context.WithTimeout(ctx, 10*time.Second)
	if left := snat.KubeVIPLeftovers(leftCtx); len(left) > 0 {
		// Not ours to remove; while it is there, kube-vip's rules may
		// SNAT what egressvip leaves alone.
		log.WithField("found", strings.Join(left, "; ")).Warn("kube-vip's egress rules are still on this node: " + snat.KubeVIPLeftoversFix())
	}
	cancelLeft()
	routes, err := steer.New(steer.Config{Node: cfg.NodeName, Mark: cfg.Mark, Log: log})
	if err != nil {
		return fmt.Errorf("steering: %w", err)
	}
	defer routes.Close()

	var ctrl *node.Controller
	poke := func() {
		if ctrl != nil {
			ctrl.Poke()
		}
	}
	detector := cidr.NewDetector(client, cidr.Override{Pod: cfg.PodCIDRs, Service: cfg.ServiceCIDRs}, 0, poke, log)

	m := metrics.New()
	elections := election.NewManager(election.Config{
		Identity:         cfg.NodeName,
		Namespace:        cfg.DaemonNamespace,
		ServiceNamespace: cfg.Namespace,
		Timing:           timing,
		HeartbeatClient:  heartbeatClient,
		Client:           electionClient,
		Poke:             poke,
		Node: func() election.NodeInfo {
			if ctrl == nil {
				return election.NodeInfo{Standing: true}
			}
			return ctrl.NodeInfo()
		},
		NodeExists: detector.NodeExists,
		Wrote:      func(kind, result string) { m.LeaseWrites.WithLabelValues(kind, result).Inc() },
		Log:        log,
	})
	var global *types.NamespacedName
	if !cfg.ServiceElection {
		global = &types.NamespacedName{Namespace: cfg.DaemonNamespace, Name: globalLeaseName}
	}
	var singletons []types.NamespacedName
	var elected func(map[types.NamespacedName]bool)
	if cfg.Allocator {
		lease := types.NamespacedName{Namespace: cfg.DaemonNamespace, Name: allocatorLeaseName}
		singletons = append(singletons, lease)
		alloc := allocator.New(allocator.Config{
			Client:         reportClient,
			ClaimNamespace: cfg.DaemonNamespace,
			Ours: func(s *corev1.Service) bool {
				return s.Spec.Type == corev1.ServiceTypeLoadBalancer && cfg.Owns(s.Spec.LoadBalancerClass) &&
					(cfg.Namespace == "" || s.Namespace == cfg.Namespace)
			},
			Refuse: func(ip netip.Addr) string {
				return desired.Admission{NodeAddresses: detector.NodeAddresses(), Exclude: detector.Exclude(), Allowed: cfg.AllowedCIDRs}.Refuse(ip)
			},
			Recorder: recorder,
			Log:      log.WithField("component", "allocator"),
		})
		m.Registry.MustRegister(alloc.Collectors()...)
		elected = runWhileElected(ctx, lease, alloc.Run, log)
	}
	neighbours := watchNeighbours(ctx, compat.Node{Client: client, Backend: backendName(snatw), Tunnel: tunnel != nil, Mark: cfg.Mark,
		ServiceInterface: iface}, poke, log)
	ctrl, err = node.New(node.Options{
		Node:            cfg.NodeName,
		Namespace:       cfg.Namespace,
		DaemonNamespace: cfg.DaemonNamespace,
		Owns:            cfg.Owns,
		Global:          global,
		Singletons:      singletons,
		Elected:         elected,
		SNATUnavailable: snatUnavailable,
		EgressBlocked:   neighbours,
		Resync:          time.Minute,
		RetryPeriod:     cfg.RetryPeriod,
		RenewDeadline:   cfg.RenewDeadline,
		Grace:           cfg.LeaseDuration,
		Allowed:         cfg.AllowedCIDRs,
		ExcludeNodes:    cfg.ExcludeNodes,
		Tunnel:          tunnel,
		Metrics:         m,
	}, client, reportClient, addrs, snatw, routes, elections, detector, recorder, log)
	if err != nil {
		return err
	}
	log.WithFields(logrus.Fields{"namespace": cfg.DaemonNamespace, "from": cfg.DaemonNamespaceSource}).Info("daemon namespace: heartbeats and address Leases")
	// Addresses removed by someone else, the interface going down and up
	// or being re-created: noticed at once, not at the next resync.
	go func() {
		if err := addrs.Watch(ctx, ctrl.Poke); err != nil {
			log.WithError(err).Warn("cannot watch the serviceInterface; changes to it are repaired at the next resync")
		}
	}()
	// Another host claiming or probing an address this node holds.
	go func() {
		err := addrs.Conflicts(ctx, func(c netif.Conflict) {
			ctrl.Conflict(plan.Conflict{Addr: c.Addr, MAC: c.MAC.String(), Probe: c.Probe, At: c.At})
		})
		if err != nil && ctx.Err() == nil {
			log.WithError(err).Warn("cannot listen for address conflicts on the serviceInterface")
		}
	}()
	go reportHostSettings(ctx, routes, log)
	ctrl.AddSynced(detector.HasSynced)
	ctrl.AddSynced(elections.HasSynced)
	if cfg.PrometheusServer != "" {
		go func() {
			health := metrics.Health{
				Alive: ctrl.Alive,
				Ready: func() error {
					if !elections.HeartbeatOK() {
						return fmt.Errorf("not ready: the heartbeat Lease in namespace %q cannot be written (see the log)", cfg.DaemonNamespace)
					}
					return ctrl.Ready()
				},
			}
			if err := m.Serve(ctx, cfg.PrometheusServer, health); err != nil {
				log.WithError(err).WithField("address", cfg.PrometheusServer).Error("metrics and health endpoints unavailable")
			}
		}()
	}
	// The heartbeat starts at once: a restarted daemon renews it before
	// the previous process's can expire.
	elections.Run(ctx)
	detector.Start(ctx.Done())
	return ctrl.Run(ctx)
}

// tunnelDevice is egressvip's VXLAN device.
const tunnelDevice = "egressvip.vx"

// allocatorLeaseName elects the one node that allocates addresses.
const allocatorLeaseName = "egressvip.allocator"

// runWhileElected returns the controller's Elected callback that runs task
// while this node holds lease and cancels it when it does not.
func runWhileElected(ctx context.Context, lease types.NamespacedName, task func(context.Context) error, log *logrus.Entry) func(map[types.NamespacedName]bool) {
	var cancel context.CancelFunc
	return func(elected map[types.NamespacedName]bool) {
		switch {
		case elected[lease] && cancel == nil:
			var taskCtx context.Context
			taskCtx, cancel = context.WithCancel(ctx)
			log.WithField("lease", lease.String()).Info("elected: starting the address allocator")
			go func() {
				if err := task(taskCtx); err != nil && taskCtx.Err() == nil {
					log.WithError(err).Error("address allocator stopped")
				}
			}()
		case !elected[lease] && cancel != nil:
			log.WithField("lease", lease.String()).Info("no longer elected: stopping the address allocator")
			cancel()
			cancel = nil
		}
	}
}

// reportHostSettings logs, once each and again when they change, the host
// settings that would drop steered traffic (egressvip changes no setting
// of an interface it does not own).
func reportHostSettings(ctx context.Context, routes *steer.Manager, log *logrus.Entry) {
	seen := map[string]bool{}
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		now := map[string]bool{}
		for _, f := range routes.Diagnose() {
			now[f.String()] = true
			if !seen[f.String()] {
				log.WithField("setting", f.Setting).Error("host setting drops steered egress traffic: " + f.String())
			}
		}
		seen = now
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// cleanup removes everything egressvip owns on this node: its addresses on
// the serviceInterface and its SNAT chains. It needs no API server.
func cleanup(logger *logrus.Logger) error {
	cfg, err := loadConfig(logger)
	if err != nil {
		return err
	}
	log := logrus.NewEntry(logger)
	iface, err := serviceInterface(cfg)
	if err != nil {
		return err
	}
	var errs []error
	if addrs, err := netif.New(netif.Config{Interface: iface, Log: log}); err != nil {
		errs = append(errs, err)
	} else if err := addrs.Cleanup(); err != nil {
		errs = append(errs, fmt.Errorf("remove addresses from %s: %w", iface, err))
	}
	if m, err := snat.New(snat.Config{Backend: cfg.Backend, NFTables: cfg.EgressWithNFTables, Log: log}); err != nil {
		errs = append(errs, err)
	} else if err := m.Cleanup(); err != nil {
		errs = append(errs, fmt.Errorf("remove SNAT chains: %w", err))
	}
	if r, err := steer.New(steer.Config{Node: cfg.NodeName, Mark: cfg.Mark, Log: log}); err != nil {
		errs = append(errs, err)
	} else {
		if err := r.Cleanup(context.Background()); err != nil {
			errs = append(errs, fmt.Errorf("remove steering rules: %w", err))
		}
		r.Close()
	}
	if len(errs) > 0 {
		return fmt.Errorf("cleanup: %v", errs)
	}
	log.Info("cleanup complete")
	return nil
}

// neighbourInterval is how often the neighbours are looked at again.
const neighbourInterval = 10 * time.Minute

// watchNeighbours looks at the node's neighbours (pkg/compat) now and every
// neighbourInterval: each finding is logged once while it lasts (a
// blocking one at error level); the returned function says why egress
// cannot work on this node, or "". A change pokes the sync loop.
func watchNeighbours(ctx context.Context, n compat.Node, poke func(), log *logrus.Entry) func() string {
	var blocked atomic.Value
	blocked.Store("")
	seen := map[string]bool{}
	look := func() {
		gctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		findings := compat.Check(compat.Gather(gctx, n))
		cancel()
		now, why := map[string]bool{}, ""
		for _, f := range findings {
			now[f.String()] = true
			if f.Blocking && why == "" {
				why = f.Message
			}
			if seen[f.String()] {
				continue
			}
			l := log.WithField("neighbour", f.Component)
			if f.Blocking {
				l.Error("egress cannot work on this node: " + f.Message)
			} else {
				l.Warn(f.Message)
			}
		}
		seen = now
		if blocked.Swap(why) != why {
			poke()
		}
	}
	look()
	go func() {
		t := time.NewTicker(neighbourInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				look()
			}
		}
	}()
	return func() string { return blocked.Load().(string) }
}

// backendName is the firewall backend's name, "" without one.
func backendName(s node.SNAT) string {
	if m, ok := s.(*snat.Manager); ok && m != nil {
		return m.Backend()
	}
	return ""
}
