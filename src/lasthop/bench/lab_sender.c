/* lab_sender.c: the small-packet sender of `lasthop bench lab`.
 *
 * Writes COUNT minimum-size Ethernet/IPv4/UDP frames (60 bytes) straight to
 * an interface through an AF_PACKET socket (PACKET_QDISC_BYPASS, sendmmsg in
 * batches), pinned to one CPU, and prints one JSON line:
 *   {"sent": N, "warmup": W, "handshake": H, "cpu_ns": <this thread's CPU time>, "wall_ns": <elapsed>}
 * --warmup W first sends W frames of the same kind, untimed (caches and
 * the path warm, in the same process: no exec between warm-up and timing);
 * they are not in "sent" (nor are the handshake's H frames, below).
 *
 * On a veth, each frame's whole journey (the host's forwarding, the
 * reflector's answer, the answer's way back) runs in softirq on this CPU
 * when the send returns from its bottom-half-disabled section; the kernel
 * (without CONFIG_IRQ_TIME_ACCOUNTING) charges that time to this thread, so
 * cpu_ns covers the sender and the whole path, with nanosecond resolution.
 *
 * Flows: --flows F cycles the UDP source port over F values (established
 * flows); --new BASE makes every frame a new flow, numbered from BASE:
 * source 10.64.0.0/10 + id / 50000, source port 10000 + id % 50000. The
 * warm-up frames of --new take the ids BASE .. BASE + W - 1, the timed ones
 * the next COUNT.
 *
 * --tcp (with --flows): TCP segments instead (60-byte frames: a 20-byte TCP
 * header, no data), each flow an established connection: with
 * --handshake, before the warm-up, a SYN per flow (seq TCP_ISN), which the
 * reflector answers with a SYN-ACK (seq 0, ack TCP_ISN + 1), then the ACK of
 * it per flow; then every frame is an ACK (seq TCP_ISN + 1, ack 1), which
 * the reflector answers with seq and ack swapped -- a connection whose both
 * ends have nothing more to say, as conntrack's window tracking and
 * lasthop's handshake check accept it. Checksums are computed.
 *
 * Built with the system's cc by lasthop.bench.lab at bench time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME_LEN 60
#define BATCH 64
#define DST_PORT 9            /* discard; the reflector answers anything */
#define FLOW_PORT_BASE 10000
#define NEW_FLOWS_PER_ADDR 50000
#define NEW_FLOW_NET 0x0a400000u /* 10.64.0.0 */
#define TCP_ISN 1000u            /* the client's initial sequence number (--tcp) */

struct args {
	const char *ifname;
	unsigned char dst_mac[6], src_mac[6];
	uint32_t src_ip, dst_ip; /* host byte order */
	unsigned long long count, flows, new_base, warmup;
	int new_flows, cpu, tcp, handshake;
	uint8_t tcp_flags; /* --tcp: the flags of the frames being sent */
};

static void die(const char *what)
{
	fprintf(stderr, "lab_sender: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: lab_sender IF DST_MAC SRC_MAC SRC_IP DST_IP COUNT (--flows F [--tcp [--handshake]] | --new BASE) [--cpu N] [--warmup W]\n");
	exit(2);
}

static void parse_mac(const char *text, unsigned char *mac)
{
	if (sscanf(text, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6)
		usage();
}

static uint32_t parse_ip(const char *text)
{
	struct in_addr a;
	if (inet_pton(AF_INET, text, &a) != 1)
		usage();
	return ntohl(a.s_addr);
}

static uint16_t ip_checksum(const void *hdr)
{
	const uint16_t *p = hdr;
	uint32_t sum = 0;
	for (int i = 0; i < 10; i++)
		sum += p[i];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* The TCP checksum of a segment of tcp_len bytes (header and data) under ip. */
static uint16_t tcp_checksum(const struct iphdr *ip, const void *tcp, unsigned int tcp_len)
{
	const uint16_t *p = tcp;
	uint32_t sum = 0;
	sum += (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) + (ip->daddr >> 16);
	sum += htons(IPPROTO_TCP) + htons((uint16_t)tcp_len);
	for (unsigned int i = 0; i < tcp_len / 2; i++)
		sum += p[i];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void build_tcp(const struct args *a, unsigned char *frame)
{
	struct iphdr *ip = (void *)(frame + sizeof(struct ether_header));
	ip->tot_len = htons(sizeof(*ip) + sizeof(struct tcphdr));
	ip->protocol = IPPROTO_TCP;
	ip->check = 0;
	ip->check = ip_checksum(ip);
	memset(ip + 1, 0, FRAME_LEN - sizeof(struct ether_header) - sizeof(*ip));
	struct tcphdr *th = (void *)(ip + 1);
	th->dest = htons(DST_PORT);
	th->doff = 5;
	th->window = htons(65535);
	(void)a;
}

/* Gives a --tcp frame its flags (and the sequence numbers they go with). */
static void set_tcp(const struct args *a, unsigned char *frame)
{
	struct iphdr *ip = (void *)(frame + sizeof(struct ether_header));
	struct tcphdr *th = (void *)(ip + 1);
	int syn = a->tcp_flags == TH_SYN;
	((uint8_t *)th)[13] = a->tcp_flags;
	th->seq = htonl(syn ? TCP_ISN : TCP_ISN + 1);
	th->ack_seq = htonl(syn ? 0 : 1);
	th->check = 0;
	th->check = tcp_checksum(ip, th, sizeof(*th));
}

static void build(const struct args *a, unsigned char *frame)
{
	memset(frame, 0, FRAME_LEN);
	struct ether_header *eth = (void *)frame;
	memcpy(eth->ether_dhost, a->dst_mac, 6);
	memcpy(eth->ether_shost, a->src_mac, 6);
	eth->ether_type = htons(ETHERTYPE_IP);
	struct iphdr *ip = (void *)(eth + 1);
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = htons(FRAME_LEN - sizeof(*eth));
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	ip->saddr = htonl(a->src_ip);
	ip->daddr = htonl(a->dst_ip);
	ip->check = ip_checksum(ip);
	struct udphdr *udp = (void *)(ip + 1);
	udp->dest = htons(DST_PORT);
	udp->len = htons(FRAME_LEN - sizeof(*eth) - sizeof(*ip));
	udp->check = 0; /* optional for IPv4 */
	if (a->tcp)
		build_tcp(a, frame);
}

/* Gives frame the flow of packet number i. */
static void set_flow(const struct args *a, unsigned char *frame, unsigned long long i)
{
	struct iphdr *ip = (void *)(frame + sizeof(struct ether_header));
	struct udphdr *udp = (void *)(ip + 1);
	if (a->new_flows) {
		unsigned long long id = a->new_base + i;
		ip->saddr = htonl(NEW_FLOW_NET + (uint32_t)(id / NEW_FLOWS_PER_ADDR));
		ip->check = 0;
		ip->check = ip_checksum(ip);
		udp->source = htons(FLOW_PORT_BASE + id % NEW_FLOWS_PER_ADDR);
	} else {
		udp->source = htons(FLOW_PORT_BASE + i % a->flows); /* TCP's port is there too */
	}
	if (a->tcp)
		set_tcp(a, frame);
}

static unsigned long long ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (unsigned long long)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* Sends count frames, the first being packet number first of the run. */
static void send_frames(int fd, const struct args *a, struct mmsghdr *msgs,
			unsigned char (*frames)[FRAME_LEN], unsigned long long first,
			unsigned long long count)
{
	unsigned long long sent = 0;
	while (sent < count) {
		unsigned int n = count - sent < BATCH ? (unsigned int)(count - sent) : BATCH;
		for (unsigned int j = 0; j < n; j++)
			set_flow(a, frames[j], first + sent + j);
		unsigned int done = 0;
		while (done < n) {
			int r = sendmmsg(fd, msgs + done, n - done, 0);
			if (r < 0) {
				if (errno == EINTR || errno == ENOBUFS || errno == EAGAIN)
					continue;
				die("sendmmsg");
			}
			done += (unsigned int)r;
		}
		sent += n;
	}
}

int main(int argc, char **argv)
{
	struct args a = {.cpu = 0};
	if (argc < 9)
		usage();
	a.ifname = argv[1];
	parse_mac(argv[2], a.dst_mac);
	parse_mac(argv[3], a.src_mac);
	a.src_ip = parse_ip(argv[4]);
	a.dst_ip = parse_ip(argv[5]);
	a.count = strtoull(argv[6], NULL, 10);
	for (int i = 7; i < argc; i++) {
		const char *value = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(argv[i], "--tcp")) {
			a.tcp = 1;
			continue;
		}
		if (!strcmp(argv[i], "--handshake")) {
			a.handshake = 1;
			continue;
		}
		if (!value)
			usage();
		if (!strcmp(argv[i], "--flows"))
			a.flows = strtoull(value, NULL, 10);
		else if (!strcmp(argv[i], "--new"))
			a.new_flows = 1, a.new_base = strtoull(value, NULL, 10);
		else if (!strcmp(argv[i], "--cpu"))
			a.cpu = atoi(value);
		else if (!strcmp(argv[i], "--warmup"))
			a.warmup = strtoull(value, NULL, 10);
		else
			usage();
		i++;
	}
	if (!a.new_flows && !a.flows)
		usage();
	if ((a.tcp && a.new_flows) || (a.handshake && !a.tcp))
		usage();

	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(a.cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");

	int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: send only, receive nothing */
	if (fd < 0)
		die("socket(AF_PACKET)");
	int one = 1;
	if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)))
		die("PACKET_QDISC_BYPASS");
	struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(a.ifname), .sll_halen = 6};
	if (!to.sll_ifindex)
		die(a.ifname);
	memcpy(to.sll_addr, a.dst_mac, 6);

	static unsigned char frames[BATCH][FRAME_LEN];
	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	for (int j = 0; j < BATCH; j++) {
		build(&a, frames[j]);
		iov[j] = (struct iovec){.iov_base = frames[j], .iov_len = FRAME_LEN};
		msgs[j] = (struct mmsghdr){.msg_hdr = {.msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov[j], .msg_iovlen = 1}};
	}

	if (a.handshake) {
		/* each flow's SYN (answered by the reflector's SYN-ACK within the
		 * send), then its ACK: established at both ends */
		a.tcp_flags = TH_SYN;
		send_frames(fd, &a, msgs, frames, 0, a.flows);
		a.tcp_flags = TH_ACK;
		send_frames(fd, &a, msgs, frames, 0, a.flows);
	}
	a.tcp_flags = TH_ACK;
	send_frames(fd, &a, msgs, frames, 0, a.warmup);
	unsigned long long cpu0 = ns(CLOCK_THREAD_CPUTIME_ID), wall0 = ns(CLOCK_MONOTONIC);
	send_frames(fd, &a, msgs, frames, a.warmup, a.count);
	unsigned long long cpu = ns(CLOCK_THREAD_CPUTIME_ID) - cpu0, wall = ns(CLOCK_MONOTONIC) - wall0;
	printf("{\"sent\": %llu, \"warmup\": %llu, \"handshake\": %llu, \"cpu_ns\": %llu, \"wall_ns\": %llu}\n",
	       a.count, a.warmup, a.handshake ? 2 * a.flows : 0, cpu, wall);
	close(fd);
	return 0;
}
