package steer

import (
	"encoding/binary"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/internal/privtest"
)

// A packet checker for the checksum tests: it captures what arrives on an
// interface (AF_PACKET, with the kernel's checksum status) and verifies
// every IPv4 header checksum and TCP/UDP checksum it can, also inside
// VXLAN.

// csumStats counts what a capture saw.
type csumStats struct {
	frames  int // frames captured
	vxlan   int // of them VXLAN-encapsulated
	partial int // checksum left to the (virtual) NIC: TP_STATUS_CSUMNOTREADY
	checked int // L4 checksums verified correct
	bad     int // checksums wrong
	badWhat []string
}

func (s csumStats) String() string {
	return fmt.Sprintf("%d frames (%d VXLAN): %d with the checksum left to the NIC (partial), %d TCP/UDP checksums verified, %d wrong %v",
		s.frames, s.vxlan, s.partial, s.checked, s.bad, s.badWhat)
}

type capture struct {
	stop  atomic.Bool
	done  chan struct{}
	mu    sync.Mutex
	stats csumStats
}

// startCapture captures the frames arriving on dev in ns until stopped.
func startCapture(t testing.TB, ns *privtest.NS, dev string) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{})}
	var fd int
	var err error
	ns.Do(t, func() {
		var ifi *net.Interface
		if ifi, err = net.InterfaceByName(dev); err != nil {
			return
		}
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, proto); err != nil {
			return
		}
		if err = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			return
		}
		if err = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_AUXDATA, 1); err != nil {
			return
		}
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		t.Fatalf("capture on %s: %v", dev, err)
	}
	go func() {
		defer close(c.done)
		defer unix.Close(fd)
		buf := make([]byte, 1<<17)
		oob := make([]byte, 256)
		for !c.stop.Load() {
			n, oobn, _, from, err := unix.Recvmsg(fd, buf, oob, unix.MSG_TRUNC)
			if err != nil {
				continue
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue
			}
			status := uint32(0)
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					if m.Header.Level == unix.SOL_PACKET && m.Header.Type == unix.PACKET_AUXDATA && len(m.Data) >= int(unsafe.Sizeof(unix.TpacketAuxdata{})) {
						status = binary.NativeEndian.Uint32(m.Data[0:4])
					}
				}
			}
			if n > len(buf) {
				n = len(buf)
			}
			c.mu.Lock()
			c.stats.frames++
			checkFrame(&c.stats, buf[:n], status&unix.TP_STATUS_CSUMNOTREADY != 0, false)
			c.mu.Unlock()
		}
	}()
	return c
}

func (c *capture) finish() csumStats {
	c.stop.Store(true)
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sum16 is the ones' complement sum of b, folded, added to init.
func sum16(init uint32, b []byte) uint32 {
	s := init
	for len(b) >= 2 {
		s += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return s
}

// checkFrame verifies an Ethernet frame. partial: the kernel left the
// checksum of the innermost transport header to the NIC (CHECKSUM_PARTIAL:
// what the bytes hold there is only the pseudo-header sum), so that one is
// not verified.
func checkFrame(s *csumStats, f []byte, partial, inner bool) {
	if len(f) < 14 {
		return
	}
	etype := binary.BigEndian.Uint16(f[12:14])
	p := f[14:]
	var proto byte
	var pseudo uint32
	var l4 []byte
	var what string
	switch etype {
	case unix.ETH_P_IP:
		if len(p) < 20 {
			return
		}
		ihl := int(p[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(p[2:4]))
		if len(p) < ihl || total < ihl {
			return
		}
		if sum16(0, p[:ihl]) != 0xffff {
			s.bad++
			s.badWhat = append(s.badWhat, "IPv4 header")
		}
		if binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 {
			return // a fragment
		}
		if total < len(p) {
			p = p[:total]
		}
		proto = p[9]
		l4 = p[ihl:]
		pseudo = sum16(0, p[12:20])
		what = fmt.Sprintf("%s > %s", net.IP(p[12:16]), net.IP(p[16:20]))
	case unix.ETH_P_IPV6:
		if len(p) < 40 {
			return
		}
		plen := int(binary.BigEndian.Uint16(p[4:6]))
		proto = p[6]
		if 40+plen < len(p) {
			p = p[:40+plen]
		}
		l4 = p[40:]
		pseudo = sum16(0, p[8:40])
		what = fmt.Sprintf("%s > %s", net.IP(p[8:24]), net.IP(p[24:40]))
	default:
		return
	}
	if proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_UDP {
		return
	}
	pseudo = sum16(pseudo, []byte{0, proto, byte(len(l4) >> 8), byte(len(l4))})
	isVXLAN := proto == unix.IPPROTO_UDP && len(l4) >= 16 && binary.BigEndian.Uint16(l4[2:4]) == 4789
	if isVXLAN {
		s.vxlan++
		// The outer UDP checksum covers the inner frame, whose own
		// checksum may be the partial one: verify it only when the inner
		// one is complete.
		if !partial && binary.BigEndian.Uint16(l4[6:8]) != 0 {
			if sum16(pseudo, l4) != 0xffff {
				s.bad++
				s.badWhat = append(s.badWhat, "outer UDP "+what)
			}
		}
		checkFrame(s, l4[16:], partial, true)
		return
	}
	if partial {
		s.partial++
		return
	}
	if proto == unix.IPPROTO_UDP && binary.BigEndian.Uint16(l4[6:8]) == 0 {
		return // IPv4 UDP without checksum
	}
	if sum16(pseudo, l4) != 0xffff {
		s.bad++
		s.badWhat = append(s.badWhat, fmt.Sprintf("%s %d %s", map[bool]string{true: "inner", false: "plain"}[inner], proto, what))
		return
	}
	s.checked++
}

// Ethtool through the ioctl: the ethtool binary is not installed.
type ethtoolValue struct{ cmd, data uint32 }

type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
}

// setTxChecksum turns the transmit checksum offload (tx-checksumming) of
// dev in ns on or off, as `ethtool -K dev tx on|off`, and returns the new
// state.
func setTxChecksum(t testing.TB, ns *privtest.NS, dev string, on bool) bool {
	t.Helper()
	var err error
	var got bool
	ns.Do(t, func() {
		var fd int
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return
		}
		defer unix.Close(fd)
		ioctl := func(cmd, data uint32) (uint32, error) {
			v := ethtoolValue{cmd: cmd, data: data}
			var ifr ifreqData
			copy(ifr.name[:], dev)
			ifr.data = unsafe.Pointer(&v)
			_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
			runtime.KeepAlive(&v)
			if errno != 0 {
				return 0, errno
			}
			return v.data, nil
		}
		data := uint32(0)
		if on {
			data = 1
		}
		if _, err = ioctl(unix.ETHTOOL_STXCSUM, data); err != nil {
			err = fmt.Errorf("set tx checksum of %s: %w", dev, err)
			return
		}
		var v uint32
		v, err = ioctl(unix.ETHTOOL_GTXCSUM, 0)
		got = v != 0
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}
