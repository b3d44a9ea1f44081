package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/egressvip/egressvip/pkg/cidr"
	"github.com/egressvip/egressvip/pkg/config"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/metrics"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/node"
	"github.com/egressvip/egressvip/pkg/snat"
)

// globalLeaseName is the one Lease used when svc_election=false. The dot
// keeps it apart from every per-Service Lease name (Service names have none).
const globalLeaseName = "egressvip.services"

// eventCacheSize bounds each of the event correlator's caches (measured:
// 0.74 MB retained after Events on 2,000 Services, against 2.9 MB).
const eventCacheSize = 512

func loadConfig(log *logrus.Logger) (config.Config, error) {
	cfg, err := config.Load(os.Getenv, os.Hostname)
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

	addrs, err := netif.New(netif.Config{Interface: iface, Announce: cfg.ARP, Log: log})
	if err != nil {
		return fmt.Errorf("serviceInterface: %w", err)
	}
	var snatw node.SNAT
	snatUnavailable := ""
	if m, err := snat.New(snat.Config{Backend: cfg.Backend, NFTables: cfg.EgressWithNFTables, Log: log}); err != nil {
		// Addresses still work without a firewall backend; egress
		// Services get an Event saying why they are not egressed.
		snatUnavailable = err.Error()
		log.WithError(err).Error("egress SNAT unavailable on this node")
	} else {
		log.WithField("backend", m.Backend()).Info("egress SNAT backend")
		snatw = m
	}

	var ctrl *node.Controller
	detector := cidr.NewDetector(client, cidr.Override{Pod: cfg.PodCIDRs, Service: cfg.ServiceCIDRs}, 0, func() {
		if ctrl != nil {
			ctrl.Poke()
		}
	}, log)

	m := metrics.New()
	timing := election.Timing{LeaseDuration: cfg.LeaseDuration, RenewDeadline: cfg.RenewDeadline, RetryPeriod: cfg.RetryPeriod}
	elections := election.NewManager(election.Config{
		Identity:         cfg.NodeName,
		Namespace:        cfg.DaemonNamespace,
		ServiceNamespace: cfg.Namespace,
		Timing:           timing,
		HeartbeatClient:  heartbeatClient,
		Client:           electionClient,
		Poke: func() {
			if ctrl != nil {
				ctrl.Poke()
			}
		},
		HostAddresses: addrs.OwnAddresses,
		Wrote:         func(kind, result string) { m.LeaseWrites.WithLabelValues(kind, result).Inc() },
		Log:           log,
	})

	ctrl, err = node.New(node.Options{
		Node:            cfg.NodeName,
		Namespace:       cfg.Namespace,
		Owns:            cfg.Owns,
		Election:        cfg.ServiceElection,
		GlobalLease:     types.NamespacedName{Namespace: cfg.DaemonNamespace, Name: globalLeaseName},
		SNATUnavailable: snatUnavailable,
		Resync:          time.Minute,
		RetryPeriod:     cfg.RetryPeriod,
		Allowed:         cfg.AllowedCIDRs,
		RenewDeadline:   cfg.RenewDeadline,
		Metrics:         m,
	}, client, reportClient, addrs, snatw, elections, detector, recorder, log)
	if err != nil {
		return err
	}
	// Addresses removed by someone else, the interface going down and up
	// or being re-created: noticed at once, not at the next resync.
	go func() {
		if err := addrs.Watch(ctx, ctrl.Poke); err != nil {
			log.WithError(err).Warn("cannot watch the serviceInterface; changes to it are repaired at the next resync")
		}
	}()
	ctrl.AddSynced(detector.HasSynced)
	ctrl.AddSynced(elections.HasSynced)
	if cfg.PrometheusServer != "" {
		go func() {
			if err := m.Serve(ctx, cfg.PrometheusServer, ctrl.Ready); err != nil {
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
	if len(errs) > 0 {
		return fmt.Errorf("cleanup: %v", errs)
	}
	log.Info("cleanup complete")
	return nil
}
