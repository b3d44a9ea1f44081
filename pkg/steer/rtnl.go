package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Raw rtnetlink for the one dump that grows with the number of steered
// pods: the rules. vishvananda/netlink decodes every rule of the node into
// a netlink.Rule (about 2 kB and 8 allocations each); ruleKeys reads them in
// place and keeps only egressvip's.

// sizeofFibRuleHdr is struct fib_rule_hdr: family, dst_len, src_len, tos,
// table, two reserved bytes, action, flags (u32).
const sizeofFibRuleHdr = 12

// ownedRuleKeys lists the keys of egressvip's rules (protocol Proto), both
// families, with how many rules have each (identical rules can be added
// twice). odd says that some owned rule has selectors or an action
// egressvip never writes: only a full listing can remove it (see
// removeOdd).
func (m *Manager) ownedRuleKeys() (keys map[ruleKey]int, odd bool, err error) {
	err = retry(func() error {
		keys, odd = map[ruleKey]int{}, false
		req := nl.NewNetlinkRequest(unix.RTM_GETRULE, unix.NLM_F_DUMP)
		req.Sockets = m.sockets
		req.AddRawData(make([]byte, sizeofFibRuleHdr)) // AF_UNSPEC: both families
		var derr error
		err := req.ExecuteIter(unix.NETLINK_ROUTE, unix.RTM_NEWRULE, func(b []byte) bool {
			k, owned, exact, err := decodeRule(b)
			switch {
			case err != nil:
				derr = err
				return false
			case !owned:
			case exact:
				keys[k]++
			default:
				odd = true
			}
			return true
		})
		return errors.Join(derr, err)
	})
	if err != nil {
		return nil, false, fmt.Errorf("list rules: %w", err)
	}
	return keys, odd, nil
}

// decodeRule decodes an RTM_NEWRULE payload: owned when its protocol is
// Proto, exact when it is a rule as ruleOf writes it ("from <prefix> fwmark
// <mark>/<mask> lookup <table>", nothing else), and then its key.
func decodeRule(b []byte) (k ruleKey, owned, exact bool, err error) {
	if len(b) < sizeofFibRuleHdr {
		return k, false, false, fmt.Errorf("short rule message: %d bytes", len(b))
	}
	native := nl.NativeEndian()
	k.family = int(b[0])
	dstLen, srcLen, tos := b[1], int(b[2]), b[3]
	k.table = int(b[4])
	action, flags := b[7], native.Uint32(b[8:12])
	var src []byte
	var proto uint8
	hasMark, hasMask, other := false, false, false
	iif := ""
	suppress := uint32(0xffffffff)
	err = eachAttr(b[sizeofFibRuleHdr:], func(typ uint16, v []byte) {
		switch {
		case typ == unix.FRA_PROTOCOL && len(v) >= 1:
			proto = v[0]
		case typ == unix.FRA_PRIORITY && len(v) >= 4:
			k.priority = int(native.Uint32(v))
		case typ == unix.FRA_TABLE && len(v) >= 4:
			k.table = int(native.Uint32(v))
		case typ == unix.FRA_SRC:
			src = v
		case typ == unix.FRA_FWMARK && len(v) >= 4:
			k.mark, hasMark = native.Uint32(v), true
		case typ == unix.FRA_FWMASK && len(v) >= 4:
			k.mask, hasMask = native.Uint32(v), true
		case typ == unix.FRA_SUPPRESS_PREFIXLEN && len(v) >= 4:
			suppress = native.Uint32(v)
		case typ == unix.FRA_SUPPRESS_IFGROUP && len(v) >= 4:
			if native.Uint32(v) != 0xffffffff {
				other = true
			}
		case typ == unix.FRA_IIFNAME:
			iif = strings.TrimRight(string(v), "\x00")
		case typ == unix.FRA_PAD:
		default:
			other = true
		}
	})
	if err != nil || proto != Proto {
		return k, false, false, err
	}
	if src == nil {
		plain := srcLen == 0 && flags == 0 && tos == 0 && dstLen == 0 && hasMark && hasMask && suppress == 0xffffffff && !other
		switch {
		case action == unix.FR_ACT_BLACKHOLE && iif == "" && k.table == 0:
			k.blackhole = true
			return k, true, plain, nil
		case action == unix.FR_ACT_TO_TBL && iif == "lo" && k.table == unix.RT_TABLE_MAIN:
			k.local = true
			return k, true, plain, nil
		}
		return k, true, false, nil
	}
	ip, ok := netip.AddrFromSlice(src)
	if !ok || action != unix.FR_ACT_TO_TBL || flags != 0 || tos != 0 || dstLen != 0 || !hasMark || !hasMask ||
		suppress != 0xffffffff || other || srcLen > ip.BitLen() {
		return k, true, false, nil
	}
	k.src = netip.PrefixFrom(ip.Unmap(), srcLen)
	return k, true, true, nil
}

// removeOdd removes the owned rules ownedRuleKeys cannot describe, from a
// full listing.
func (m *Manager) removeOdd() error {
	var all []netlink.Rule
	err := retry(func() (err error) {
		all, err = m.h.RuleListFiltered(netlink.FAMILY_ALL, nil, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	var errs []error
	for i := range all {
		if all[i].Protocol != Proto {
			continue
		}
		if _, ok := keyOf(&all[i]); ok {
			continue
		}
		if err := m.delRule(&all[i]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// eachAttr calls f with the type and value of each attribute in b.
func eachAttr(b []byte, f func(typ uint16, v []byte)) error {
	native := nl.NativeEndian()
	for len(b) >= unix.SizeofRtAttr {
		l := int(native.Uint16(b[0:2]))
		if l < unix.SizeofRtAttr || l > len(b) {
			return fmt.Errorf("attribute of length %d in %d bytes: %w", l, len(b), unix.EINVAL)
		}
		f(native.Uint16(b[2:4])&nl.NLA_TYPE_MASK, b[unix.SizeofRtAttr:l])
		l = (l + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1)
		if l >= len(b) {
			break
		}
		b = b[l:]
	}
	return nil
}
