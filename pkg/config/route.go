package config

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultRouteInterface is the interface of the IPv4 default route, else
// of the IPv6 one. A nil handle means the current network namespace.
func DefaultRouteInterface(h *netlink.Handle) (string, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		routes, err := h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return "", fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst != nil && !r.Dst.IP.IsUnspecified() {
				continue
			}
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			idx := r.LinkIndex
			if idx == 0 && len(r.MultiPath) > 0 {
				idx = r.MultiPath[0].LinkIndex
			}
			link, err := h.LinkByIndex(idx)
			if err != nil {
				return "", fmt.Errorf("default route interface %d: %w", idx, err)
			}
			return link.Attrs().Name, nil
		}
	}
	return "", errors.New("no default route")
}
