// Package config reads egressvip's configuration from kube-vip's
// environment variable names and validates it at start-up.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// DefaultLoadBalancerClass is kube-vip's class name; Services of this class,
// and by default Services without a class, are ours.
const DefaultLoadBalancerClass = "kube-vip.io/kube-vip-class"

// DefaultPrometheusServer is kube-vip's metrics address.
const DefaultPrometheusServer = ":2112"

// Config is the daemon's configuration.
type Config struct {
	NodeName              string
	Interface             string
	ServiceInterface      string
	ServicesEnabled       bool
	ServiceElection       bool
	Namespace             string
	LeaseDuration         time.Duration
	RenewDeadline         time.Duration
	RetryPeriod           time.Duration
	LoadBalancerClass     string
	LoadBalancerClassOnly bool
	// PodCIDRs and ServiceCIDRs override detection when non-empty.
	PodCIDRs     []netip.Prefix
	ServiceCIDRs []netip.Prefix
	// AllowedCIDRs, when not empty, are the only ranges LoadBalancer IPs
	// may come from (egressvip_allowed_cidrs).
	AllowedCIDRs       []netip.Prefix
	EgressWithNFTables bool
	// Backend is egress_backend: auto (nftables where nft works, else
	// iptables; egress_withnftables=true means iptables-nft, kube-vip's
	// meaning), nftables, iptables-nft or iptables-legacy.
	Backend   string
	ARP       bool
	LogLevel  string
	LogFormat string
	// Kubeconfig is a kubeconfig path; "" means in-cluster configuration.
	Kubeconfig string
	// PrometheusServer is the listen address of /metrics, /healthz and
	// /readyz; "" disables it.
	PrometheusServer string
	// DaemonNamespace holds the heartbeat Leases, the address Leases and
	// the global Lease: POD_NAMESPACE, else the pod's ServiceAccount
	// namespace file, else kube-vip's cp_namespace, else kube-system (so a
	// kube-vip DaemonSet that only swaps the image keeps working).
	DaemonNamespace string
	// DaemonNamespaceSource says where DaemonNamespace came from.
	DaemonNamespaceSource string
	// ExcludeNodes keeps traffic to every Node's addresses and to the API
	// server from being SNATed (egressvip_exclude_nodes, default true;
	// false is kube-vip's behaviour).
	ExcludeNodes bool
	// Tunnel is egressvip_tunnel: "" (steer by plain routing to an on-link
	// holder) or "vxlan"; TunnelPort and TunnelVNI configure the VXLAN
	// device (egressvip_vxlan_port, egressvip_vxlan_vni).
	Tunnel     string
	TunnelPort uint16
	TunnelVNI  uint32
	// Mark is the firewall mark bit egressvip sets on steered packets
	// (egressvip_fwmark, one bit, default 0x1000).
	Mark uint32
	// Allocator turns on the built-in address allocation
	// (egressvip_allocator).
	Allocator bool
	// Client budgets, each a rate limiter of its own: the election's
	// acquisitions, releases and Lease watches; the reporter's status,
	// annotation and Event writes. The heartbeat has its own client and
	// never waits behind either.
	ElectionQPS   float32
	ElectionBurst int
	ReportQPS     float32
	ReportBurst   int
}

// maxSeconds bounds the lease timings: a day is far beyond any sensible
// setting, and larger numbers of seconds overflow a time.Duration.
const maxSeconds = 86400

// Backends of egress SNAT (egress_backend).
var Backends = []string{"auto", "nftables", "iptables-nft", "iptables-legacy"}

// Steering defaults: the VXLAN port and VNI (flannel uses 8472, Calico and
// Cilium 4789 and 8472: 4793 clashes with none of them) and the firewall
// mark bit (kube-proxy uses 0x4000 and 0x8000, Calico the upper 16 bits).
const (
	DefaultTunnelPort = 4793
	DefaultTunnelVNI  = 7331
	DefaultMark       = 0x1000
)

// Client budget defaults: the election must absorb a burst of
// acquisitions (every Service of a node that died, or all Services at
// start-up) without delaying them by seconds; the reporter's writes are
// off the datapath and may trail.
const (
	DefaultElectionQPS   = 200
	DefaultElectionBurst = 400
	DefaultReportQPS     = 50
	DefaultReportBurst   = 100
)

// Load reads the configuration through getenv; hostname is the last
// fallback for the node name. Every error names the variable.
// ServiceAccountNamespaceFile is where a pod reads its namespace (what
// client-go's in-cluster configuration reads).
const ServiceAccountNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// Load reads the configuration through getenv; hostname is the last
// fallback for the node name, readFile reads the ServiceAccount namespace
// file. Every error names the variable.
func Load(getenv func(string) string, hostname func() (string, error), readFile func(string) ([]byte, error)) (Config, error) {
	c := Config{
		Interface:         strings.TrimSpace(getenv("vip_interface")),
		ServiceInterface:  strings.TrimSpace(getenv("vip_servicesinterface")),
		Namespace:         strings.TrimSpace(getenv("svc_namespace")),
		LoadBalancerClass: strings.TrimSpace(getenv("lb_class_name")),
		LogLevel:          strings.TrimSpace(getenv("log_level")),
		LogFormat:         strings.TrimSpace(getenv("log_format")),
		Kubeconfig:        strings.TrimSpace(getenv("KUBECONFIG")),
		PrometheusServer:  strings.TrimSpace(getenv("prometheus_server")),
		DaemonNamespace:   strings.TrimSpace(getenv("POD_NAMESPACE")),
		Backend:           strings.ToLower(strings.TrimSpace(getenv("egress_backend"))),
	}
	if c.Backend == "" {
		c.Backend = "auto"
	}
	c.DaemonNamespaceSource = "POD_NAMESPACE"
	if c.DaemonNamespace == "" && readFile != nil {
		if b, err := readFile(ServiceAccountNamespaceFile); err == nil {
			c.DaemonNamespace, c.DaemonNamespaceSource = strings.TrimSpace(string(b)), "the ServiceAccount namespace file"
		}
	}
	if c.DaemonNamespace == "" {
		c.DaemonNamespace, c.DaemonNamespaceSource = strings.TrimSpace(getenv("cp_namespace")), "cp_namespace"
	}
	if c.DaemonNamespace == "" {
		c.DaemonNamespace, c.DaemonNamespaceSource = "kube-system", "the default (kube-system)"
	}
	switch c.PrometheusServer {
	case "":
		c.PrometheusServer = DefaultPrometheusServer
	case "off", "false", "disabled":
		c.PrometheusServer = ""
	}
	if c.LoadBalancerClass == "" {
		c.LoadBalancerClass = DefaultLoadBalancerClass
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.LogFormat == "" {
		c.LogFormat = "text"
	}
	for _, name := range []string{"vip_nodename", "NODE_NAME"} {
		if c.NodeName = strings.TrimSpace(getenv(name)); c.NodeName != "" {
			break
		}
	}
	if c.NodeName == "" && hostname != nil {
		if h, err := hostname(); err == nil {
			c.NodeName = strings.ToLower(strings.TrimSpace(h))
		}
	}

	var errs []error
	boolVar := func(dst *bool, name string, def bool) {
		*dst = def
		v := strings.TrimSpace(getenv(name))
		if v == "" {
			return
		}
		b, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: invalid boolean %q", name, v))
			return
		}
		*dst = b
	}
	secondsVar := func(dst *time.Duration, name string, def int) {
		*dst = time.Duration(def) * time.Second
		v := strings.TrimSpace(getenv(name))
		if v == "" {
			return
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > maxSeconds {
			errs = append(errs, fmt.Errorf("%s: want a whole number of seconds from 1 to %d, got %q", name, maxSeconds, v))
			return
		}
		*dst = time.Duration(n) * time.Second
	}
	qpsVar := func(dst *float32, name string, def float32) {
		*dst = def
		v := strings.TrimSpace(getenv(name))
		if v == "" {
			return
		}
		f, err := strconv.ParseFloat(v, 32)
		if err != nil || f <= 0 || f > 10000 {
			errs = append(errs, fmt.Errorf("%s: want requests per second between 0 and 10000, got %q", name, v))
			return
		}
		*dst = float32(f)
	}
	burstVar := func(dst *int, name string, def int) {
		*dst = def
		v := strings.TrimSpace(getenv(name))
		if v == "" {
			return
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > 100000 {
			errs = append(errs, fmt.Errorf("%s: want a whole number of requests between 1 and 100000, got %q", name, v))
			return
		}
		*dst = n
	}
	cidrVar := func(dst *[]netip.Prefix, name string) {
		v := strings.TrimSpace(getenv(name))
		if v == "" {
			return
		}
		for _, item := range strings.Split(v, ",") {
			item = strings.TrimSpace(item)
			p, err := netip.ParsePrefix(item)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %q is not a CIDR (e.g. 10.244.0.0/16)", name, item))
				return
			}
			if p != p.Masked() {
				errs = append(errs, fmt.Errorf("%s: %q has host bits set; did you mean %s?", name, item, p.Masked()))
				return
			}
			*dst = append(*dst, p)
		}
	}
	boolVar(&c.ServicesEnabled, "svc_enable", true)
	boolVar(&c.ServiceElection, "svc_election", true)
	boolVar(&c.LoadBalancerClassOnly, "lb_class_only", false)
	// kube-vip's default is true: its native nftables egress.
	boolVar(&c.EgressWithNFTables, "egress_withnftables", true)
	boolVar(&c.ExcludeNodes, "egressvip_exclude_nodes", true)
	boolVar(&c.Allocator, "egressvip_allocator", false)
	c.Tunnel = strings.ToLower(strings.TrimSpace(getenv("egressvip_tunnel")))
	if c.Tunnel != "" && c.Tunnel != "vxlan" && c.Tunnel != "none" {
		errs = append(errs, fmt.Errorf("egressvip_tunnel: %q is not vxlan or none", c.Tunnel))
	}
	if c.Tunnel == "none" {
		c.Tunnel = ""
	}
	c.TunnelPort, c.TunnelVNI, c.Mark = DefaultTunnelPort, DefaultTunnelVNI, DefaultMark
	uintVar := func(name string, max uint64, hex bool, set func(uint64)) {
		v := strings.TrimSpace(getenv(name))
		if v == "" {
			return
		}
		n, err := strconv.ParseUint(v, 0, 64)
		if err != nil || n == 0 || n > max || (hex && n&(n-1) != 0) {
			what := fmt.Sprintf("a number from 1 to %d", max)
			if hex {
				what = "a single bit such as 0x1000"
			}
			errs = append(errs, fmt.Errorf("%s: want %s, got %q", name, what, v))
			return
		}
		set(n)
	}
	uintVar("egressvip_vxlan_port", 65535, false, func(n uint64) { c.TunnelPort = uint16(n) })
	uintVar("egressvip_vxlan_vni", 1<<24-1, false, func(n uint64) { c.TunnelVNI = uint32(n) })
	uintVar("egressvip_fwmark", 1<<31, true, func(n uint64) { c.Mark = uint32(n) })
	boolVar(&c.ARP, "vip_arp", true)
	secondsVar(&c.LeaseDuration, "vip_leaseduration", 5)
	secondsVar(&c.RenewDeadline, "vip_renewdeadline", 3)
	secondsVar(&c.RetryPeriod, "vip_retryperiod", 1)
	qpsVar(&c.ElectionQPS, "egressvip_election_qps", DefaultElectionQPS)
	burstVar(&c.ElectionBurst, "egressvip_election_burst", DefaultElectionBurst)
	qpsVar(&c.ReportQPS, "egressvip_report_qps", DefaultReportQPS)
	burstVar(&c.ReportBurst, "egressvip_report_burst", DefaultReportBurst)
	cidrVar(&c.PodCIDRs, "egress_podcidr")
	cidrVar(&c.ServiceCIDRs, "egress_servicecidr")
	cidrVar(&c.AllowedCIDRs, "egressvip_allowed_cidrs")
	return c, errors.Join(errs...)
}

// Validate checks what single variables cannot: the node name and the
// relation between the lease timings.
func (c Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("vip_nodename: empty, and neither NODE_NAME nor the hostname gives a node name"))
	}
	if c.LeaseDuration <= c.RenewDeadline {
		errs = append(errs, fmt.Errorf("vip_leaseduration (%s) must be greater than vip_renewdeadline (%s)", c.LeaseDuration, c.RenewDeadline))
	}
	if float64(c.RenewDeadline) <= 1.2*float64(c.RetryPeriod) {
		errs = append(errs, fmt.Errorf("vip_renewdeadline (%s) must be greater than 1.2 x vip_retryperiod (%s)", c.RenewDeadline, c.RetryPeriod))
	}
	if _, err := logrus.ParseLevel(c.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("log_level: %q is not a level (panic, fatal, error, warn, info, debug, trace)", c.LogLevel))
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("log_format: %q is not text or json", c.LogFormat))
	}
	if c.PrometheusServer != "" {
		_, port, err := net.SplitHostPort(c.PrometheusServer)
		if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 1 || n > 65535 {
			errs = append(errs, fmt.Errorf("prometheus_server: %q is not host:port with a port from 1 to 65535 (e.g. :2112), or off", c.PrometheusServer))
		}
	}
	if !slices.Contains(Backends, c.Backend) {
		errs = append(errs, fmt.Errorf("egress_backend: %q is not one of %s", c.Backend, strings.Join(Backends, ", ")))
	}
	return errors.Join(errs...)
}

// EffectiveServiceInterface is vip_servicesinterface if set, else
// vip_interface ("" means: detect the default route's interface).
func (c Config) EffectiveServiceInterface() string {
	if c.ServiceInterface != "" {
		return c.ServiceInterface
	}
	return c.Interface
}

// Owns says whether a Service with that spec.loadBalancerClass is ours:
// our class always, no class unless lb_class_only, any other class never.
func (c Config) Owns(class *string) bool {
	if class == nil || *class == "" {
		return !c.LoadBalancerClassOnly
	}
	return *class == c.LoadBalancerClass
}
