/* lab_endpoints.bpf.c: the two ends of `lasthop bench lab`'s traffic, as tc
 * programs, so that neither end costs a process or a socket per packet.
 *
 * bench_reflect (the VM's eth0, tc ingress): answers every IPv4 UDP packet
 *   in place, the way a server on a symmetric path would answer it: swaps
 *   the MACs, the IPv4 addresses and the UDP ports, and sends the frame back
 *   out of the interface it came in on. The checksums stay valid (a swap
 *   does not change a ones'-complement sum).
 * bench_sink (the client's eth0, tc ingress): drops every IPv4 UDP packet,
 *   after the veth has counted it (rx_packets = replies received).
 *
 * Anything else passes unchanged. Built with clang by lasthop.bench.lab at
 * bench time; loaded with `tc filter ... bpf da`.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* The UDP header of an IPv4 UDP frame without IP options, or NULL. */
static __always_inline struct udphdr *udp4(void *data, void *data_end, struct ethhdr **eth, struct iphdr **ip)
{
	*eth = data;
	if ((void *)(*eth + 1) > data_end || (*eth)->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	*ip = (void *)(*eth + 1);
	if ((void *)(*ip + 1) > data_end || (*ip)->ihl != 5 || (*ip)->protocol != IPPROTO_UDP)
		return NULL;
	struct udphdr *udp = (void *)(*ip + 1);
	if ((void *)(udp + 1) > data_end)
		return NULL;
	return udp;
}

SEC("tc/reflect")
int bench_reflect(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp = udp4(data, data_end, &eth, &ip);
	if (!udp)
		return TC_ACT_OK;

	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	__be32 addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	__be16 port = udp->source;
	udp->source = udp->dest;
	udp->dest = port;
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc/sink")
int bench_sink(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	return udp4(data, data_end, &eth, &ip) ? TC_ACT_SHOT : TC_ACT_OK;
}
