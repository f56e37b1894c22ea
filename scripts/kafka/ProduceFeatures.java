// Kafka's own Java code as the reference for leaderlink's produce features (the test suite runs
// it; see tests/forwarding/kafka_produce_features.rs). Run as a single-file program:
//
//   java -cp ".cache/kafka/<version>/libs/*" scripts/kafka/ProduceFeatures.java partitions N < KEYS
//     For each line of KEYS (a key in hex; an empty line is the empty key) prints the partition
//     Java's default partitioner gives it among N partitions: Utils.toPositive(Utils.murmur2(key))
//     % N. Exits 1 if BuiltInPartitioner.partitionForKey (what KafkaProducer calls) disagrees.
//
//   java -cp ... scripts/kafka/ProduceFeatures.java read BOOTSTRAP TOPIC PARTITION COUNT
//     Reads COUNT records of TOPIC-PARTITION from offset 0 with KafkaConsumer and prints one line
//     per record: offset, key, value and headers, tab-separated. Bytes are hex, a null is "-",
//     headers are "key=value" pairs (key and value in hex) joined by ",". Exits 1 if fewer than
//     COUNT records arrive within 30 s.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.utils.Utils;

public class ProduceFeatures {
    private static final HexFormat HEX = HexFormat.of();

    public static void main(String[] args) throws Exception {
        if (args.length == 2 && args[0].equals("partitions")) {
            partitions(Integer.parseInt(args[1]));
        } else if (args.length == 5 && args[0].equals("read")) {
            read(args[1], args[2], Integer.parseInt(args[3]), Integer.parseInt(args[4]));
        } else {
            System.err.println("usage: ProduceFeatures partitions N < KEYS"
                    + " | ProduceFeatures read BOOTSTRAP TOPIC PARTITION COUNT");
            System.exit(64);
        }
    }

    private static void partitions(int n) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        StringBuilder out = new StringBuilder();
        for (String line; (line = in.readLine()) != null; ) {
            byte[] key = HEX.parseHex(line.trim());
            int p = Utils.toPositive(Utils.murmur2(key)) % n;
            int producer = BuiltInPartitioner.partitionForKey(key, n);
            if (p != producer) {
                System.err.println("key " + line + ": Utils gives " + p + ", BuiltInPartitioner " + producer);
                System.exit(1);
            }
            out.append(p).append('\n');
        }
        System.out.print(out);
    }

    private static String hex(byte[] b) {
        return b == null ? "-" : HEX.formatHex(b);
    }

    private static void read(String bootstrap, String topic, int partition, int count) {
        Properties c = new Properties();
        c.put("bootstrap.servers", bootstrap);
        c.put("enable.auto.commit", "false");
        c.put("key.deserializer", ByteArrayDeserializer.class.getName());
        c.put("value.deserializer", ByteArrayDeserializer.class.getName());
        List<String> lines = new ArrayList<>();
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(c)) {
            TopicPartition tp = new TopicPartition(topic, partition);
            consumer.assign(List.of(tp));
            consumer.seek(tp, 0);
            long until = System.currentTimeMillis() + 30_000;
            while (lines.size() < count && System.currentTimeMillis() < until) {
                for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
                    List<String> headers = new ArrayList<>();
                    for (Header h : r.headers()) {
                        headers.add(hex(h.key().getBytes(java.nio.charset.StandardCharsets.UTF_8)) + "=" + hex(h.value()));
                    }
                    lines.add(r.offset() + "\t" + hex(r.key()) + "\t" + hex(r.value()) + "\t" + String.join(",", headers));
                }
            }
        }
        lines.forEach(System.out::println);
        if (lines.size() < count) {
            System.err.println("read " + lines.size() + " of " + count + " records of " + topic + "-" + partition);
            System.exit(1);
        }
    }
}
