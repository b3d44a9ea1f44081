package allocator

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Names on claim Leases. The role label keeps them out of the election's
// informers, which select heartbeats, address and Service Leases by role;
// the prefix keeps their names apart from those Leases' names.
const (
	ClaimPrefix          = "egressvip.alloc."
	LabelManagedBy       = "app.kubernetes.io/managed-by"
	ManagedBy            = "egressvip"
	LabelRole            = "egressvip.io/role"
	RoleAllocation       = "allocation"
	AnnotationAddress    = "egressvip.io/address"
	AnnotationNamespace  = "egressvip.io/namespace"
	AnnotationServices   = "egressvip.io/services"
	claimHolderSeparator = ","
)

// claim is an address claim Lease: the address belongs to one namespace,
// and the allocator handed it to the member Services.
type claim struct {
	name, namespace string
	addr            netip.Addr
	members         []string
	uid             types.UID
	resourceVersion string
	lease           *coordinationv1.Lease
}

// ClaimName is the claim Lease of an address. IPv6 addresses are written
// out in full with dashes, so every name is a valid DNS subdomain.
func ClaimName(a netip.Addr) string {
	a = a.Unmap()
	if a.Is4() {
		return ClaimPrefix + a.String()
	}
	return ClaimPrefix + strings.ReplaceAll(a.StringExpanded(), ":", "-")
}

// claimOf reads a claim Lease; ok is false for any other Lease.
func claimOf(l *coordinationv1.Lease) (*claim, bool) {
	if l == nil || l.Labels[LabelRole] != RoleAllocation || !strings.HasPrefix(l.Name, ClaimPrefix) {
		return nil, false
	}
	a, err := netip.ParseAddr(l.Annotations[AnnotationAddress])
	if err != nil || ClaimName(a) != l.Name {
		return nil, false
	}
	ns := l.Annotations[AnnotationNamespace]
	if ns == "" {
		return nil, false
	}
	c := &claim{name: l.Name, namespace: ns, addr: a, uid: l.UID, resourceVersion: l.ResourceVersion, lease: l}
	if m := l.Annotations[AnnotationServices]; m != "" {
		c.members = strings.Split(m, claimHolderSeparator)
	}
	return c, true
}

// newClaim is the claim Lease of a for members of namespace ns.
func newClaim(daemonNS string, a netip.Addr, ns string, members []string, now time.Time) *coordinationv1.Lease {
	t := metav1.NewMicroTime(now)
	holder := ns
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{
			Name: ClaimName(a), Namespace: daemonNS,
			Labels: map[string]string{LabelManagedBy: ManagedBy, LabelRole: RoleAllocation},
			Annotations: map[string]string{AnnotationAddress: a.String(), AnnotationNamespace: ns,
				AnnotationServices: strings.Join(members, claimHolderSeparator)},
		},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, AcquireTime: &t, RenewTime: &t},
	}
}

// touched is c renewed for members: the same namespace, a new renewTime,
// written with c's resourceVersion so that it fails if c changed.
func touched(c *claim, members []string, now time.Time) *coordinationv1.Lease {
	l := c.lease.DeepCopy()
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	m := slices.Clone(members)
	slices.Sort(m)
	l.Annotations[AnnotationServices] = strings.Join(slices.Compact(m), claimHolderSeparator)
	t := metav1.NewMicroTime(now)
	l.Spec.RenewTime = &t
	return l
}
