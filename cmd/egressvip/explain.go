package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/egressvip/egressvip/pkg/cidr"
	"github.com/egressvip/egressvip/pkg/config"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/explain"
	"github.com/egressvip/egressvip/pkg/explain/kernel"
	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/snat"
)

const explainUsage = `usage: egressvip explain <namespace>/<service> [-o text|json] [--no-age] [--no-kernel] [--timeout 30s]

Explains why the Service's pods leave with its LoadBalancer IP, or not: its
addresses (and why any is refused), its egress settings and the Warning
Events the daemon raises, the holder of each address and its heartbeat,
every node's eligibility and rank, each endpoint's trust and path out
(SNAT on the holder, steered to it, held, or the node's address) and, run
on a node (in the daemon's container), what that node's kernel holds for
the Service. It reads the API server with the environment of
'egressvip run' (KUBECONFIG, else the in-cluster config, else
~/.kube/config; POD_NAMESPACE, svc_namespace, lb_class_name,
vip_leaseduration, ...) and writes nothing.

  -o text|json   output format (default text; json: the explain.Report struct)
  --no-age       blank the time, heartbeat ages and routing table numbers
                 (stable output for golden tests)
  --no-kernel    do not read this node's kernel
  --timeout D    give up reading the API server after D (default 30s)
`

// usageError is a command line the user must fix.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// explainOptions are explain's command line.
type explainOptions struct {
	target   types.NamespacedName
	output   string
	noAge    bool
	noKernel bool
	timeout  time.Duration
}

// parseExplain reads explain's arguments; flags may come before or after
// the Service.
func parseExplain(args []string) (explainOptions, error) {
	o := explainOptions{output: "text", timeout: 30 * time.Second}
	fs := flag.NewFlagSet("explain", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.output, "o", o.output, "")
	fs.StringVar(&o.output, "output", o.output, "")
	fs.BoolVar(&o.noAge, "no-age", false, "")
	fs.BoolVar(&o.noKernel, "no-kernel", false, "")
	fs.DurationVar(&o.timeout, "timeout", o.timeout, "")
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return o, usageError{err}
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(positional) != 1 {
		return o, usageError{errors.New("explain needs exactly one <namespace>/<service>")}
	}
	ns, name, ok := strings.Cut(positional[0], "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return o, usageError{fmt.Errorf("%q is not <namespace>/<service>", positional[0])}
	}
	o.target = types.NamespacedName{Namespace: ns, Name: name}
	if o.output != "text" && o.output != "json" {
		return o, usageError{fmt.Errorf("-o %q: want text or json", o.output)}
	}
	return o, nil
}

// explainCmd runs `egressvip explain`.
func explainCmd(ctx context.Context, logger *logrus.Logger, args []string, stdout io.Writer) error {
	o, err := parseExplain(args)
	if err != nil {
		return err
	}
	cfg, err := loadConfig(logger)
	if err != nil {
		return err
	}
	// The reads log nothing of interest unless asked to.
	if logger.GetLevel() > logrus.WarnLevel && cfg.LogLevel != "debug" && cfg.LogLevel != "trace" {
		logger.SetLevel(logrus.WarnLevel)
	}
	log := logrus.NewEntry(logger)
	rc, err := explainRESTConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client configuration: %w", err)
	}
	rc.UserAgent = "egressvip-explain/" + version
	client, err := kube.New(rc)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	ecfg := explain.Config{
		DaemonNamespace: cfg.DaemonNamespace,
		Namespace:       cfg.Namespace,
		Owns:            cfg.Owns,
		Timing:          election.Timing{LeaseDuration: cfg.LeaseDuration, RenewDeadline: cfg.RenewDeadline, RetryPeriod: cfg.RetryPeriod},
		Allowed:         cfg.AllowedCIDRs,
		Override:        cidr.Override{Pod: cfg.PodCIDRs, Service: cfg.ServiceCIDRs},
	}
	if !cfg.ServiceElection {
		ecfg.Global = &types.NamespacedName{Namespace: cfg.DaemonNamespace, Name: globalLeaseName}
	}
	if cfg.Tunnel == "vxlan" {
		ecfg.Tunnel = &model.Tunnel{VNI: cfg.TunnelVNI, Port: cfg.TunnelPort, Device: tunnelDevice}
	}
	fctx, cancel := context.WithTimeout(ctx, o.timeout)
	objs, err := explain.Fetch(fctx, client, o.target, ecfg)
	cancel()
	if err != nil {
		return err
	}
	now := time.Now()
	if !slices.ContainsFunc(objs.Leases, func(l *coordinationv1.Lease) bool {
		return l.Labels[election.LabelRole] == election.RoleHeartbeat
	}) {
		log.Warnf("no egressvip heartbeat in namespace %q (from %s): if the daemon runs elsewhere, set POD_NAMESPACE to its namespace",
			cfg.DaemonNamespace, cfg.DaemonNamespaceSource)
	}
	var local *explain.Local
	if !o.noKernel && onNode(cfg.NodeName, objs) {
		iface, ierr := serviceInterface(cfg)
		local = kernel.Read(ctx, kernel.Config{Node: cfg.NodeName, Interface: iface, InterfaceErr: ierr, Log: log,
			SNAT: snat.Config{Backend: cfg.Backend, NFTables: cfg.EgressWithNFTables, Mark: cfg.Mark}})
	}
	r := explain.Build(o.target, now, objs, ecfg, local)
	if o.noAge {
		r = explain.MaskVolatile(r)
	}
	if o.output == "json" {
		err = explain.JSON(stdout, r)
	} else {
		err = explain.Render(stdout, r)
	}
	if err != nil {
		return fmt.Errorf("write the report: %w", err)
	}
	if !r.Service.Found {
		return fmt.Errorf("service %s not found", o.target)
	}
	return nil
}

// onNode says whether explain runs on one of the cluster's nodes: the
// configured node name (vip_nodename, NODE_NAME, the hostname) is a
// Node's or has an egressvip heartbeat.
func onNode(name string, objs explain.Objects) bool {
	for _, n := range objs.Nodes {
		if n.Name == name {
			return true
		}
	}
	for _, l := range objs.Leases {
		if l.Name == election.HeartbeatName(name) && l.Labels[election.LabelRole] == election.RoleHeartbeat {
			return true
		}
	}
	return false
}

// explainRESTConfig is the daemon's client configuration (KUBECONFIG, else
// in-cluster) and, off the cluster without KUBECONFIG, kubectl's default
// (~/.kube/config).
func explainRESTConfig(cfg config.Config) (*rest.Config, error) {
	rc, err := restConfig(cfg)
	if err == nil || cfg.Kubeconfig != "" {
		return rc, err
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rc, derr := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if derr != nil {
		return nil, fmt.Errorf("no in-cluster configuration (%w), and no kubeconfig: %w", err, derr)
	}
	return rc, nil
}

// explainMain runs explain from main: usage errors exit 2 with the usage.
func explainMain(log *logrus.Logger) error {
	err := explainCmd(context.Background(), log, os.Args[2:], os.Stdout)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Print(explainUsage)
		return nil
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(os.Stderr, "%v\n\n%s", err, explainUsage)
		os.Exit(2)
	}
	return err
}
