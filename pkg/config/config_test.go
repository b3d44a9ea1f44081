package config

import (
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func host(name string) func() (string, error) { return func() (string, error) { return name, nil } }

// noFile is a pod without a ServiceAccount namespace file (out of cluster).
func noFile(string) ([]byte, error) { return nil, errors.New("no such file") }

func file(content string) func(string) ([]byte, error) {
	return func(p string) ([]byte, error) {
		if p != ServiceAccountNamespaceFile {
			return nil, errors.New("no such file")
		}
		return []byte(content), nil
	}
}

func TestLoadDefaults(t *testing.T) {
	c, err := Load(env(nil), host("Worker-1"), noFile)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		NodeName: "worker-1", ServicesEnabled: true, ServiceElection: true,
		LeaseDuration: 5 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: time.Second,
		LoadBalancerClass: DefaultLoadBalancerClass, ARP: true, LogLevel: "info", LogFormat: "text",
		PrometheusServer: ":2112", DaemonNamespace: "kube-system", DaemonNamespaceSource: "the default (kube-system)", Backend: "auto",
		ElectionQPS: DefaultElectionQPS, ElectionBurst: DefaultElectionBurst, ReportQPS: DefaultReportQPS, ReportBurst: DefaultReportBurst,
		EgressWithNFTables: true, ExcludeNodes: true, TunnelPort: DefaultTunnelPort, TunnelVNI: DefaultTunnelVNI, Mark: DefaultMark,
	}
	if !equal(c, want) {
		t.Fatalf("defaults\n got %+v\nwant %+v", c, want)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
}

func equal(a, b Config) bool {
	return reflect.DeepEqual(a, b)
}

func TestLoadVariables(t *testing.T) {
	for _, tc := range []struct {
		name  string
		env   map[string]string
		check func(Config) bool
	}{
		{name: "vip_nodename wins", env: map[string]string{"vip_nodename": "a", "NODE_NAME": "b"}, check: func(c Config) bool { return c.NodeName == "a" }},
		{name: "NODE_NAME fallback", env: map[string]string{"NODE_NAME": "b"}, check: func(c Config) bool { return c.NodeName == "b" }},
		{name: "interfaces", env: map[string]string{"vip_interface": "eth0", "vip_servicesinterface": "eth1"},
			check: func(c Config) bool { return c.EffectiveServiceInterface() == "eth1" && c.Interface == "eth0" }},
		{name: "interface only", env: map[string]string{"vip_interface": "eth0"}, check: func(c Config) bool { return c.EffectiveServiceInterface() == "eth0" }},
		{name: "booleans", env: map[string]string{"svc_enable": "false", "svc_election": "0", "lb_class_only": "true", "egress_withnftables": "TRUE", "vip_arp": "f"},
			check: func(c Config) bool {
				return !c.ServicesEnabled && !c.ServiceElection && c.LoadBalancerClassOnly && c.EgressWithNFTables && !c.ARP
			}},
		{name: "namespace and class", env: map[string]string{"svc_namespace": "prod", "lb_class_name": "example.com/lb"},
			check: func(c Config) bool { return c.Namespace == "prod" && c.LoadBalancerClass == "example.com/lb" }},
		{name: "timing", env: map[string]string{"vip_leaseduration": "15", "vip_renewdeadline": "10", "vip_retryperiod": "2"},
			check: func(c Config) bool {
				return c.LeaseDuration == 15*time.Second && c.RenewDeadline == 10*time.Second && c.RetryPeriod == 2*time.Second
			}},
		{name: "dual-stack cidrs", env: map[string]string{"egress_podcidr": "10.244.0.0/16, fd00:10:244::/56", "egress_servicecidr": "10.96.0.0/12"},
			check: func(c Config) bool {
				return slices.Equal(c.PodCIDRs, []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/56")}) &&
					slices.Equal(c.ServiceCIDRs, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")})
			}},
		{name: "metrics address", env: map[string]string{"prometheus_server": "127.0.0.1:9100"}, check: func(c Config) bool { return c.PrometheusServer == "127.0.0.1:9100" }},
		{name: "metrics off", env: map[string]string{"prometheus_server": "off"}, check: func(c Config) bool { return c.PrometheusServer == "" }},
		{name: "backend", env: map[string]string{"egress_backend": "IPtables-legacy"}, check: func(c Config) bool { return c.Backend == "iptables-legacy" }},
		{name: "client budgets and namespace", env: map[string]string{"egressvip_election_qps": "50.5", "egressvip_election_burst": "100",
			"egressvip_report_qps": "5", "egressvip_report_burst": "7", "POD_NAMESPACE": "kube-system"},
			check: func(c Config) bool {
				return c.ElectionQPS == 50.5 && c.ElectionBurst == 100 && c.ReportQPS == 5 && c.ReportBurst == 7 && c.DaemonNamespace == "kube-system"
			}},
		{name: "logging and kubeconfig", env: map[string]string{"log_level": "debug", "log_format": "json", "KUBECONFIG": "/k"},
			check: func(c Config) bool { return c.LogLevel == "debug" && c.LogFormat == "json" && c.Kubeconfig == "/k" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(env(tc.env), host("h"), noFile)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(c) {
				t.Fatalf("unexpected %+v", c)
			}
		})
	}
}

func TestBadValuesNameTheVariable(t *testing.T) {
	for _, tc := range []struct {
		name, variable, value string
		validate              bool
	}{
		{name: "bool", variable: "svc_election", value: "maybe"},
		{name: "bool arp", variable: "vip_arp", value: "yes"},
		{name: "seconds", variable: "vip_leaseduration", value: "5s"},
		{name: "negative seconds", variable: "vip_retryperiod", value: "-1"},
		{name: "pod cidr", variable: "egress_podcidr", value: "10.244.0.0"},
		{name: "host bits", variable: "egress_servicecidr", value: "10.96.0.1/12"},
		{name: "seconds that overflow a duration", variable: "vip_leaseduration", value: "18446744080"},
		{name: "metrics port out of range", variable: "prometheus_server", value: ":99999", validate: true},
		{name: "metrics port zero", variable: "prometheus_server", value: ":0", validate: true},
		{name: "unknown backend", variable: "egress_backend", value: "ebpf", validate: true},
		{name: "election qps", variable: "egressvip_election_qps", value: "0"},
		{name: "report qps", variable: "egressvip_report_qps", value: "fast"},
		{name: "election burst", variable: "egressvip_election_burst", value: "-3"},
		{name: "report burst", variable: "egressvip_report_burst", value: "1.5"},
		{name: "timing relation", variable: "vip_renewdeadline", value: "5", validate: true},
		{name: "level", variable: "log_level", value: "loud", validate: true},
		{name: "format", variable: "log_format", value: "xml", validate: true},
		{name: "metrics address", variable: "prometheus_server", value: "2112", validate: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(env(map[string]string{tc.variable: tc.value}), host("h"), noFile)
			if tc.validate {
				if err != nil {
					t.Fatal(err)
				}
				err = c.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), tc.variable) {
				t.Fatalf("error %v does not name %s", err, tc.variable)
			}
		})
	}
}

func TestNoNodeName(t *testing.T) {
	c, err := Load(env(nil), func() (string, error) { return "", errors.New("no hostname") }, noFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "vip_nodename") {
		t.Fatalf("want an error naming vip_nodename, got %v", err)
	}
}

func TestOwns(t *testing.T) {
	ours, other, empty := DefaultLoadBalancerClass, "example.com/other", ""
	for _, tc := range []struct {
		name      string
		classOnly bool
		class     *string
		want      bool
	}{
		{name: "no class", class: nil, want: true},
		{name: "empty class", class: &empty, want: true},
		{name: "our class", class: &ours, want: true},
		{name: "foreign class", class: &other, want: false},
		{name: "no class with lb_class_only", classOnly: true, class: nil, want: false},
		{name: "our class with lb_class_only", classOnly: true, class: &ours, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{LoadBalancerClass: DefaultLoadBalancerClass, LoadBalancerClassOnly: tc.classOnly}
			if got := c.Owns(tc.class); got != tc.want {
				t.Fatalf("Owns = %v, want %v", got, tc.want)
			}
		})
	}
}

// The daemon's namespace: POD_NAMESPACE, else the pod's ServiceAccount
// namespace (a kube-vip DaemonSet that only swaps the image, without
// POD_NAMESPACE), else kube-vip's cp_namespace, else kube-system.
func TestDaemonNamespace(t *testing.T) {
	for _, tc := range []struct {
		name     string
		env      map[string]string
		readFile func(string) ([]byte, error)
		want     string
	}{
		{"POD_NAMESPACE wins", map[string]string{"POD_NAMESPACE": "egressvip", "cp_namespace": "cp"}, file("kube-vip\n"), "egressvip"},
		{"ServiceAccount namespace", map[string]string{"cp_namespace": "cp"}, file(" kube-vip\n"), "kube-vip"},
		{"cp_namespace", map[string]string{"cp_namespace": "cp"}, noFile, "cp"},
		{"kube-system", nil, noFile, "kube-system"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(env(tc.env), host("h"), tc.readFile)
			if err != nil {
				t.Fatal(err)
			}
			if c.DaemonNamespace != tc.want {
				t.Errorf("namespace %q (from %s), want %q", c.DaemonNamespace, c.DaemonNamespaceSource, tc.want)
			}
		})
	}
}

func TestSteeringSettings(t *testing.T) {
	c, err := Load(env(map[string]string{"egressvip_tunnel": "VXLAN", "egressvip_vxlan_port": "4800", "egressvip_vxlan_vni": "42", "egressvip_fwmark": "0x20000"}), host("h"), noFile)
	if err != nil {
		t.Fatal(err)
	}
	if c.Tunnel != "vxlan" || c.TunnelPort != 4800 || c.TunnelVNI != 42 || c.Mark != 0x20000 {
		t.Errorf("got tunnel %q port %d vni %d mark %#x", c.Tunnel, c.TunnelPort, c.TunnelVNI, c.Mark)
	}
	for _, bad := range []map[string]string{
		{"egressvip_tunnel": "gre"}, {"egressvip_vxlan_port": "70000"}, {"egressvip_vxlan_port": "0"},
		{"egressvip_fwmark": "0x3000"}, {"egressvip_vxlan_vni": "16777216"},
	} {
		if _, err := Load(env(bad), host("h"), noFile); err == nil {
			t.Errorf("%v: accepted", bad)
		}
	}
}
