/* lab_endpoints.bpf.c: the two ends of `lasthop bench lab`'s traffic, as tc
 * programs, so that neither end costs a process or a socket per packet.
 *
 * bench_reflect (the VM's eth0, tc ingress): answers every IPv4 UDP packet
 *   in place, the way a server on a symmetric path would answer it: swaps
 *   the MACs, the IPv4 addresses and the UDP ports, and sends the frame back
 *   out of the interface it came in on. The checksums stay valid (a swap
 *   does not change a ones'-complement sum). A TCP segment (the sender's
 *   --tcp) likewise, with its sequence and acknowledgement numbers swapped
 *   (the answer of a connection with nothing more to say); a SYN gets a
 *   SYN-ACK (seq 0, ack = its seq + 1: the checksum updated for the two
 *   changed words). A RST or FIN passes.
 * bench_sink (the client's eth0, tc ingress): drops every IPv4 UDP or TCP
 *   packet, after the veth has counted it (rx_packets = replies received).
 *
 * Anything else passes unchanged. Built with clang by lasthop.bench.lab at
 * bench time; loaded with `tc filter ... bpf da`.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/stddef.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define TCP_FLAGS_OFF 13 /* the TCP header's flags byte */
#define TH_FIN_ 0x01
#define TH_SYN_ 0x02
#define TH_RST_ 0x04
#define TH_ACK_ 0x10

/* The L4 header (UDP, or TCP with its 20 bytes) of an IPv4 frame without IP
 * options, or NULL. */
static __always_inline void *l4(void *data, void *data_end, struct ethhdr **eth, struct iphdr **ip)
{
	*eth = data;
	if ((void *)(*eth + 1) > data_end || (*eth)->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	*ip = (void *)(*eth + 1);
	if ((void *)(*ip + 1) > data_end || (*ip)->ihl != 5)
		return NULL;
	if ((*ip)->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(*ip + 1);
		return (void *)(udp + 1) > data_end ? NULL : udp;
	}
	if ((*ip)->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(*ip + 1);
		return (void *)(th + 1) > data_end ? NULL : th;
	}
	return NULL;
}

SEC("tc/reflect")
int bench_reflect(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports = l4(data, data_end, &eth, &ip);
	if (!ports)
		return TC_ACT_OK;
	int tcp = ip->protocol == IPPROTO_TCP;
	__u32 csum_off = sizeof(*eth) + sizeof(*ip) + offsetof(struct tcphdr, check);
	__u8 flags = 0;
	__be32 old_ack = 0, new_ack = 0;
	__be16 old_word = 0, new_word = 0;

	if (tcp) {
		struct tcphdr *th = (void *)ports;
		flags = ((__u8 *)th)[TCP_FLAGS_OFF];
		if (flags & (TH_RST_ | TH_FIN_))
			return TC_ACT_OK;
		__be32 seq = th->seq;
		th->seq = th->ack_seq;
		th->ack_seq = seq;
		if (flags & TH_SYN_) { /* a SYN-ACK: seq 0 (the swap), ack = seq + 1 */
			old_ack = th->ack_seq;
			new_ack = bpf_htonl(bpf_ntohl(old_ack) + 1);
			th->ack_seq = new_ack;
			old_word = *(__be16 *)((__u8 *)th + TCP_FLAGS_OFF - 1);
			((__u8 *)th)[TCP_FLAGS_OFF] = TH_SYN_ | TH_ACK_;
			new_word = *(__be16 *)((__u8 *)th + TCP_FLAGS_OFF - 1);
		}
	}
	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	__be32 addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	__be16 port = ports[0];
	ports[0] = ports[1];
	ports[1] = port;
	if (tcp && (flags & TH_SYN_)) { /* after the direct writes: these may move the data */
		bpf_l4_csum_replace(skb, csum_off, old_ack, new_ack, sizeof(new_ack));
		bpf_l4_csum_replace(skb, csum_off, old_word, new_word, sizeof(new_word));
	}
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc/sink")
int bench_sink(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	return l4(data, data_end, &eth, &ip) ? TC_ACT_SHOT : TC_ACT_OK;
}
