package snat

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"syscall"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Direct nftables netlink reads for the cheap check: the ruleset
// generation and a digest of one table. Both work in the network namespace
// of the calling thread, like the nft binary that writes.

// errNoGeneration says that a backend has no ruleset generation to compare
// (iptables-legacy, or fakes without one).
var errNoGeneration = errors.New("no ruleset generation")

// nftGeneration returns the nftables ruleset generation (NFT_MSG_GETGEN).
// The kernel increments it once per committed nftables transaction, whoever
// commits it: nft, iptables-nft, kube-proxy, a CNI. An unchanged generation
// means that no nftables object changed, so the cheap check is one netlink
// round trip.
func nftGeneration() (uint32, error) {
	msgs, err := nftRequest(unix.NFT_MSG_GETGEN, unix.AF_UNSPEC, 0)
	if err != nil {
		return 0, fmt.Errorf("nftables generation: %w", err)
	}
	for _, m := range msgs {
		if id, ok := parseGenID(m); ok {
			return id, nil
		}
	}
	return 0, errors.New("nftables generation: no NFTA_GEN_ID in the kernel's answer")
}

// parseGenID reads NFTA_GEN_ID from the payload of an NFT_MSG_NEWGEN
// message: a struct nfgenmsg, then netlink attributes (host-endian header,
// big-endian value).
func parseGenID(msg []byte) (uint32, bool) {
	if len(msg) < nl.SizeofNfgenmsg {
		return 0, false
	}
	var (
		id    uint32
		found bool
	)
	forAttrs(msg[nl.SizeofNfgenmsg:], func(typ uint16, data, _ []byte) {
		if typ == unix.NFTA_GEN_ID && len(data) >= 4 {
			id, found = binary.BigEndian.Uint32(data), true
		}
	})
	return id, found
}

// nftRequest sends one nftables request and returns the payloads (nfgenmsg
// and attributes) of the answer's messages.
func nftRequest(msgType int, family uint8, flags int, attrs ...*nl.RtAttr) ([][]byte, error) {
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_NFTABLES<<8|msgType, flags)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: family, Version: nl.NFNETLINK_V0})
	for _, a := range attrs {
		req.AddData(a)
	}
	return req.Execute(unix.NETLINK_NETFILTER, 0)
}

// forAttrs calls fn with the type (flags masked), value and raw bytes of
// each netlink attribute in b.
func forAttrs(b []byte, fn func(typ uint16, data, raw []byte)) {
	for len(b) >= unix.SizeofNlAttr {
		l := int(nl.NativeEndian().Uint16(b[0:2]))
		if l < unix.SizeofNlAttr || l > len(b) {
			return
		}
		typ := nl.NativeEndian().Uint16(b[2:4]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		fn(typ, b[unix.SizeofNlAttr:l], b[:l])
		next := (l + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		if next > len(b) {
			return
		}
		b = b[next:]
	}
}

// attrString returns the string attribute typ of a message payload.
func attrString(msg []byte, typ uint16) string {
	var s string
	forAttrs(msg[nl.SizeofNfgenmsg:], func(t uint16, data, _ []byte) {
		if t == typ {
			s = string(bytes.TrimRight(data, "\x00"))
		}
	})
	return s
}

func cstring(s string) []byte { return append([]byte(s), 0) }

// nftFingerprint returns a SHA-256 digest of everything table holds in
// family: the table, its chains, rules and sets as the kernel serialises
// them, and every set's elements (sorted, as a hash set's walk order may
// change by itself). Only equal contents have equal digests; the
// generation numbers of the message headers and chain counters are left
// out. A missing table is ErrNoTable. A dump interrupted by a concurrent
// commit is retried.
func nftFingerprint(family uint8, table string) ([]byte, error) {
	var err error
	for range 3 {
		var sum []byte
		if sum, err = nftFingerprintOnce(family, table); !errors.Is(err, nl.ErrDumpInterrupted) {
			return sum, err
		}
	}
	return nil, err
}

func nftFingerprintOnce(family uint8, table string) ([]byte, error) {
	h := sha256.New()
	write := func(tag byte, attrs []byte) {
		var hdr [5]byte
		hdr[0] = tag
		binary.BigEndian.PutUint32(hdr[1:], uint32(len(attrs)))
		h.Write(hdr[:])
		h.Write(attrs)
	}
	msgs, err := nftRequest(unix.NFT_MSG_GETTABLE, family, 0, nl.NewRtAttr(unix.NFTA_TABLE_NAME, cstring(table)))
	if errors.Is(err, syscall.ENOENT) {
		return nil, fmt.Errorf("%w %d %s", ErrNoTable, family, table)
	}
	if err != nil {
		return nil, fmt.Errorf("get table: %w", err)
	}
	for _, m := range msgs {
		write('T', m[nl.SizeofNfgenmsg:])
	}

	// The table name filters rule and set dumps in the kernel; chain dumps
	// are filtered here (and everything is checked here).
	dumps := []struct {
		tag     byte
		msgType int
		attr    *nl.RtAttr
		table   uint16
	}{
		{'C', unix.NFT_MSG_GETCHAIN, nil, unix.NFTA_CHAIN_TABLE},
		{'R', unix.NFT_MSG_GETRULE, nl.NewRtAttr(unix.NFTA_RULE_TABLE, cstring(table)), unix.NFTA_RULE_TABLE},
		{'S', unix.NFT_MSG_GETSET, nl.NewRtAttr(unix.NFTA_SET_TABLE, cstring(table)), unix.NFTA_SET_TABLE},
	}
	var sets []string
	for _, d := range dumps {
		var attrs []*nl.RtAttr
		if d.attr != nil {
			attrs = append(attrs, d.attr)
		}
		msgs, err := nftRequest(d.msgType, family, unix.NLM_F_DUMP, attrs...)
		if err != nil {
			return nil, fmt.Errorf("dump %c: %w", d.tag, err)
		}
		for _, m := range msgs {
			if len(m) < nl.SizeofNfgenmsg || attrString(m, d.table) != table {
				continue
			}
			body := m[nl.SizeofNfgenmsg:]
			if d.tag == 'C' {
				var kept []byte
				forAttrs(body, func(typ uint16, _, raw []byte) {
					if typ != unix.NFTA_CHAIN_COUNTERS {
						kept = append(kept, raw...)
					}
				})
				body = kept
			}
			if d.tag == 'S' {
				sets = append(sets, attrString(m, unix.NFTA_SET_NAME))
			}
			write(d.tag, body)
		}
	}
	for _, set := range sets {
		msgs, err := nftRequest(unix.NFT_MSG_GETSETELEM, family, unix.NLM_F_DUMP,
			nl.NewRtAttr(unix.NFTA_SET_ELEM_LIST_TABLE, cstring(table)),
			nl.NewRtAttr(unix.NFTA_SET_ELEM_LIST_SET, cstring(set)))
		if err != nil {
			return nil, fmt.Errorf("dump elements of %s: %w", set, err)
		}
		var elems [][]byte
		for _, m := range msgs {
			if len(m) < nl.SizeofNfgenmsg {
				continue
			}
			forAttrs(m[nl.SizeofNfgenmsg:], func(typ uint16, data, _ []byte) {
				if typ != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
					return
				}
				forAttrs(data, func(_ uint16, _, raw []byte) { elems = append(elems, raw) })
			})
		}
		slices.SortFunc(elems, bytes.Compare)
		write('s', cstring(set))
		for _, e := range elems {
			write('e', e)
		}
	}
	return h.Sum(nil), nil
}
