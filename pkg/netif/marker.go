package netif

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AddrProto is the address protocol (IFA_PROTO, Linux ≥ 5.18) egressvip
// stamps on every address it binds: the marker of ownership that works for
// any interface name, because unlike the IPv4 label it does not have to
// fit in 15 characters together with the name, and it follows renames.
//
// The kernel and iproute2 define only 0 (unspec), 1 (kernel_lo),
// 2 (kernel_ra) and 3 (kernel_ll); the rest of the 8-bit space is free for
// whoever adds addresses. 0xe7 (231) is egressvip's. To see it by name with
// iproute2 ≥ 6.3: `echo '231 egressvip' >> /etc/iproute2/rt_addrprotos`,
// then `ip addr show proto egressvip`.
const AddrProto uint8 = 0xe7

// ifaProto is the IFA_PROTO attribute type (include/uapi/linux/if_addr.h);
// golang.org/x/sys/unix and vishvananda/netlink v1.3.1 do not define it.
const ifaProto = 11

// Addr is a kernel address with its protocol, which netlink.Addr lacks.
type Addr struct {
	netlink.Addr
	// Protocol is IFA_PROTO: who added the address (0 when unset or when
	// the kernel predates it).
	Protocol uint8
}

// label is the IPv4 label of owned addresses, or "" when it does not fit.
// It is still set next to the protocol when it fits, so that a downgraded
// egressvip (which knows only the label) still recognises the addresses.
func label(iface string) string {
	if l := iface + LabelSuffix; len(l) <= 15 {
		return l
	}
	return ""
}

// Owned decides whether a kernel address on iface is egressvip's: a full
// length (/32, /128), non-link-local address that carries AddrProto, or
// one bound by a version before AddrProto: deprecated (preferred lifetime
// 0) and, for IPv4, labelled "<iface>:evip", for IPv6 flagged NODAD.
// Other flags do not matter, IFA_F_NOPREFIXROUTE among them (the IPv6
// addresses of earlier versions lack it, current ones have it).
func Owned(a Addr, iface string) bool {
	if a.IPNet == nil || a.Peer != nil {
		return false
	}
	ip, ok := netip.AddrFromSlice(a.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	ones, bits := a.Mask.Size()
	if ones != bits || bits != ip.BitLen() {
		return false
	}
	labelled := false
	if ip.Is4() {
		l := label(iface)
		labelled = l != "" && a.Label == l
	}
	return owned(ip, uint32(a.Flags), a.Protocol, labelled)
}

// owned is Owned for a full-length address without peer; labelled says
// whether it is IPv4 labelled "<iface>:evip".
func owned(ip netip.Addr, flags uint32, proto uint8, labelled bool) bool {
	if ip.IsLinkLocalUnicast() {
		return false
	}
	if proto == AddrProto {
		return true
	}
	// Legacy markers. The kernel reports the lifetimes of an address that
	// is valid forever as forever, but keeps preferred lifetime 0 as the
	// deprecated flag.
	if flags&unix.IFA_F_DEPRECATED == 0 {
		return false
	}
	if ip.Is4() {
		return labelled
	}
	return flags&unix.IFA_F_NODAD != 0
}

// owned is Owned for an address of a dump.
func (m *Manager) owned(a ifAddr) bool {
	labelled := a.ip.Is4() && m.label != "" && string(a.label) == m.label
	return a.full && owned(a.ip, a.flags, a.proto, labelled)
}

// kernelHasAddrProto says whether the running kernel stores IFA_PROTO
// (Linux 5.18, commit 47f0bd503210). Older kernels silently ignore the
// attribute, so it cannot be probed by adding an address: the release
// decides. A distribution kernel that backported it only loses the
// protocol marker (the label fallback applies), never ownership.
var kernelHasAddrProto = sync.OnceValue(func() bool { return releaseAtLeast(kernelRelease(), 5, 18) })

// kernelHasNoPrefixRoute says whether the running kernel knows
// IFA_F_NOPREFIXROUTE for IPv6 (Linux 3.14). An older one drops the flag
// silently: Sync would then try to set it on every address at every Sync.
var kernelHasNoPrefixRoute = sync.OnceValue(func() bool { return releaseAtLeast(kernelRelease(), 3, 14) })

var kernelRelease = sync.OnceValue(func() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
})

// releaseAtLeast parses the major.minor prefix of a kernel release such as
// "6.18.44-fc-v669" or "5.18.0-rc1".
func releaseAtLeast(release string, major, minor int) bool {
	fields := strings.FieldsFunc(release, func(r rune) bool { return r < '0' || r > '9' })
	if len(fields) < 2 {
		return false
	}
	maj, err1 := strconv.Atoi(fields[0])
	mnr, err2 := strconv.Atoi(fields[1])
	if err1 != nil || err2 != nil {
		return false
	}
	return maj > major || maj == major && mnr >= minor
}

// CheckOwnable says whether egressvip can mark the addresses it binds to
// iface so that it finds them again (after a restart, for failover,
// Service deletion, SIGTERM and `egressvip cleanup`). On Linux ≥ 5.18 the
// address protocol marks them on any interface; on older kernels only the
// IPv4 label "<iface>:evip" does, which fits in the kernel's 15 characters
// only for names of at most 10. New calls it, so the daemon stops at
// start-up instead of binding IPv4 addresses it could never remove.
func CheckOwnable(iface string) error {
	return checkOwnable(iface, kernelHasAddrProto())
}

func checkOwnable(iface string, withProto bool) error {
	switch {
	case iface == "":
		return fmt.Errorf("no interface configured")
	case len(iface) > unix.IFNAMSIZ-1:
		return fmt.Errorf("interface name %q is longer than %d characters", iface, unix.IFNAMSIZ-1)
	case withProto || label(iface) != "":
		return nil
	}
	return fmt.Errorf("interface name %q is longer than %d characters: this kernel predates Linux 5.18 (no address protocol), "+
		"so egressvip can mark its IPv4 addresses only with the label %q, which exceeds the kernel's 15 characters; "+
		"rename the interface or run Linux 5.18 or later", iface, 15-len(LabelSuffix), iface+LabelSuffix)
}
