#!/usr/bin/env python3
"""Wires a bucket's event notifications on the test servers (run it with .venv/bin/python:
boto3 comes with moto, see scripts/setup-moto.sh).

  events.py rgw-topic  --endpoint URL --bucket B --push http://127.0.0.1:PORT [--topic T] [--persistent]
      Ceph RGW: creates topic T (default: "<bucket>-follow") with that HTTP push endpoint through
      RGW's SNS-compatible API, then sets the bucket's TopicConfigurations for
      s3:ObjectCreated:* and s3:ObjectRemoved:*. Prints the topic ARN (last stdout line).
  events.py moto-queue --endpoint URL --bucket B --queue NAME
      moto: creates SQS queue NAME on the same server, then sets the bucket's
      QueueConfigurations for the same events. Prints the queue URL (last stdout line).

RGW 16.2 topics, measured: without --persistent, RGW POSTs the event before it answers the
write, so every write to the bucket waits for the endpoint's answer (`follow` answers once the
change is durable; an endpoint that never answers held a PUT for minutes) and an event the
endpoint refuses (503) is dropped. With --persistent, writes do not wait: RGW queues the events
and delivers them (the first ~30 s after the topic is made, while RGW takes up its queue;
then within about 0.1 s) and retries a refused POST at once, in a tight loop (thousands a
second), until it is taken.

Credentials: --access-key/--secret-key, else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else the
test user of scripts/rgw.sh (testing / testing-secret). Path-style, region us-east-1 (RGW's
SNS API takes region "default"). Errors end the script with one line on stderr and exit 1.
"""

import argparse
import os
import sys

EVENTS = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]


def session(args):
    import boto3
    from botocore.config import Config

    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3})
    kw = dict(
        endpoint_url=args.endpoint,
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        config=cfg,
    )
    return boto3, kw


def rgw_topic(args):
    boto3, kw = session(args)
    topic = args.topic or f"{args.bucket}-follow"
    sns = boto3.client("sns", region_name="default", **kw)
    attrs = {
        "push-endpoint": args.push,
        "persistent": "true" if args.persistent else "false",
    }
    arn = sns.create_topic(Name=topic, Attributes=attrs)["TopicArn"]
    s3 = boto3.client("s3", region_name="us-east-1", **kw)
    s3.put_bucket_notification_configuration(
        Bucket=args.bucket,
        NotificationConfiguration={
            "TopicConfigurations": [
                {"Id": topic, "TopicArn": arn, "Events": EVENTS},
            ]
        },
    )
    print(arn)


def moto_queue(args):
    boto3, kw = session(args)
    sqs = boto3.client("sqs", region_name="us-east-1", **kw)
    url = sqs.create_queue(QueueName=args.queue)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3 = boto3.client("s3", region_name="us-east-1", **kw)
    s3.put_bucket_notification_configuration(
        Bucket=args.bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"Id": args.queue, "QueueArn": arn, "Events": EVENTS},
            ]
        },
    )
    print(url)


def main():
    p = argparse.ArgumentParser(description="Wires bucket notifications on moto and Ceph RGW.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--endpoint", required=True, help="the S3 endpoint, http://HOST:PORT")
        sp.add_argument("--bucket", required=True)
        sp.add_argument(
            "--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", "testing")
        )
        sp.add_argument(
            "--secret-key",
            default=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing-secret"),
        )

    t = sub.add_parser("rgw-topic", help="RGW: a topic with an HTTP push endpoint")
    common(t)
    t.add_argument("--push", required=True, help="http://ADDR:PORT the events are POSTed to")
    t.add_argument("--topic", help="the topic's name (default: BUCKET-follow)")
    t.add_argument("--persistent", action="store_true", help="RGW retries until delivered")
    t.set_defaults(run=rgw_topic)

    q = sub.add_parser("moto-queue", help="moto: an SQS queue the bucket notifies")
    common(q)
    q.add_argument("--queue", required=True, help="the queue's name")
    q.set_defaults(run=moto_queue)

    args = p.parse_args()
    try:
        args.run(args)
    except Exception as e:  # one line, not a traceback
        print(f"events.py {args.cmd}: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
