// Package netif binds LoadBalancer IPs to the serviceInterface with netlink
// and announces them with gratuitous ARP / unsolicited neighbour advertisement.
package netif
