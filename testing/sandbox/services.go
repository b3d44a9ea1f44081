package sandbox

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// ExternalService is a ClusterIP Service without a selector whose
// endpoints, in EndpointSlices the sandbox writes, are the external host:
// kube-proxy DNATs a pod's connection to one of its ClusterIPs to the
// external host, on the same port (TCPPort, TCPOtherPort, UDPPort,
// UDPOtherPort). So the external host sees what source address
// Service traffic leaves the node with.
type ExternalService struct {
	Namespace, Name string
	// ClusterIP4 and ClusterIP6 are the Service's ClusterIPs.
	ClusterIP4, ClusterIP6 netip.Addr
}

// ClusterIP is the Service's ClusterIP of a family.
func (s *ExternalService) ClusterIP(ipv6 bool) netip.Addr {
	if ipv6 {
		return s.ClusterIP6
	}
	return s.ClusterIP4
}

// externalPorts are the external host's ports, as Service ports.
func externalPorts() []corev1.ServicePort {
	var out []corev1.ServicePort
	for _, p := range []struct {
		proto corev1.Protocol
		port  int32
	}{{corev1.ProtocolTCP, TCPPort}, {corev1.ProtocolTCP, TCPOtherPort}, {corev1.ProtocolUDP, UDPPort}, {corev1.ProtocolUDP, UDPOtherPort}} {
		out = append(out, corev1.ServicePort{
			Name:     fmt.Sprintf("%s-%d", map[corev1.Protocol]string{corev1.ProtocolTCP: "tcp", corev1.ProtocolUDP: "udp"}[p.proto], p.port),
			Protocol: p.proto, Port: p.port, TargetPort: intstr.FromInt32(p.port),
		})
	}
	return out
}

// CreateExternalService creates namespace/name as an ExternalService
// (dual-stack) and waits until kube-proxy on every node has programmed
// every port of both ClusterIPs. Delete it with DeleteExternalService.
func (c *Cluster) CreateExternalService(ctx context.Context, namespace, name string) (*ExternalService, error) {
	if c.KubeProxyMode() == KubeProxyNone {
		return nil, errors.New("an external Service needs kube-proxy (mode none)")
	}
	policy := corev1.IPFamilyPolicyRequireDualStack
	svc, err := c.Admin.CoreV1().Services(namespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.ServiceSpec{
			Type:           corev1.ServiceTypeClusterIP,
			IPFamilyPolicy: &policy,
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Ports:          externalPorts(),
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create Service %s/%s: %w", namespace, name, err)
	}
	s := &ExternalService{Namespace: namespace, Name: name}
	for _, ip := range svc.Spec.ClusterIPs {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			return s, fmt.Errorf("Service %s/%s: ClusterIP %q: %w", namespace, name, ip, err)
		}
		if a.Is4() {
			s.ClusterIP4 = a
		} else {
			s.ClusterIP6 = a
		}
	}
	if !s.ClusterIP4.IsValid() || !s.ClusterIP6.IsValid() {
		return s, fmt.Errorf("Service %s/%s: want an IPv4 and an IPv6 ClusterIP, got %v", namespace, name, svc.Spec.ClusterIPs)
	}
	owner := metav1.OwnerReference{APIVersion: "v1", Kind: "Service", Name: name, UID: svc.UID}
	ready := true
	for _, fam := range []struct {
		suffix string
		typ    discoveryv1.AddressType
		addr   string
	}{{"ipv4", discoveryv1.AddressTypeIPv4, ExternalHost4}, {"ipv6", discoveryv1.AddressTypeIPv6, ExternalHost6}} {
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{
				Namespace: namespace, Name: name + "-external-" + fam.suffix,
				Labels: map[string]string{
					discoveryv1.LabelServiceName: name,
					discoveryv1.LabelManagedBy:   "sandbox.egressvip.invalid",
				},
				OwnerReferences: []metav1.OwnerReference{owner},
			},
			AddressType: fam.typ,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{fam.addr}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		}
		for _, p := range svc.Spec.Ports {
			slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: &p.Name, Protocol: &p.Protocol, Port: &p.Port})
		}
		if _, err := c.Admin.DiscoveryV1().EndpointSlices(namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			return s, fmt.Errorf("create EndpointSlice %s: %w", slice.Name, err)
		}
	}
	for _, ip := range []netip.Addr{s.ClusterIP4, s.ClusterIP6} {
		for _, p := range svc.Spec.Ports {
			proto := map[corev1.Protocol]string{corev1.ProtocolTCP: "tcp", corev1.ProtocolUDP: "udp"}[p.Protocol]
			if err := c.WaitProxied(ctx, ip, proto, int(p.Port), 30*time.Second); err != nil {
				return s, err
			}
		}
	}
	return s, nil
}

// DeleteExternalService deletes the Service and its EndpointSlices.
func (c *Cluster) DeleteExternalService(ctx context.Context, s *ExternalService) error {
	err := c.Admin.CoreV1().Services(s.Namespace).Delete(ctx, s.Name, metav1.DeleteOptions{})
	for _, suffix := range []string{"ipv4", "ipv6"} {
		_ = c.Admin.DiscoveryV1().EndpointSlices(s.Namespace).Delete(ctx, s.Name+"-external-"+suffix, metav1.DeleteOptions{})
	}
	return err
}

// KubernetesServiceIP is the ClusterIP of the default/kubernetes Service,
// whose endpoint is the API server.
func KubernetesServiceIP() netip.Addr { return kubernetesServiceIP }

// DialAPIServerFrom opens a TCP connection from pod p to the kubernetes
// Service (10.96.0.1:443), which kube-proxy DNATs to the API server, and
// completes a TLS handshake that verifies the API server's certificate
// for kubernetes.default.svc against the cluster CA. It returns the
// address the connection was made to.
func (c *Cluster) DialAPIServerFrom(ctx context.Context, p *Pod) (netip.AddrPort, error) {
	caPEM, err := os.ReadFile(c.path("ca.crt"))
	if err != nil {
		return netip.AddrPort{}, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return netip.AddrPort{}, errors.New("ca.crt: no certificate")
	}
	dst := netip.AddrPortFrom(kubernetesServiceIP, 443)
	var conn net.Conn
	if err := Do(p.NS, func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		var err error
		conn, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	}); err != nil {
		return dst, fmt.Errorf("pod %s: connect to %s: %w", p.Name, dst, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	tc := tls.Client(conn, &tls.Config{RootCAs: pool, ServerName: "kubernetes.default.svc", MinVersion: tls.VersionTLS12})
	if err := tc.HandshakeContext(ctx); err != nil {
		return dst, fmt.Errorf("pod %s: TLS handshake with %s: %w", p.Name, dst, err)
	}
	return dst, tc.Close()
}
